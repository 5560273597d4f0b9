"""Terminal rendering (loradeploy/render.py): what the quantize table says about the budget
and the held-out texts, for a fidelity budget and for a byte limit."""

import pytest


def _record(budget: dict) -> dict:
    adapter = {"measured_pytorch": {"mean_abs_logit": 0.000137}, "format_counts": {"int8": 55, "fp16": 10},
               "bytes": 149_936, "bytes_dense_fp16_max_rank": 663_552, "chosen_by": "learned", "chosen_from": "search",
               "held_out": {"texts": 512, "slack": 1.5, "measured": {"mean_abs_logit": 0.000265}, "backed_off_from": None}}
    held_out = {"texts": 512, "sha256": "0" * 64, "slack": 1.5}
    return {"method": "learned", "target": "onnx-cpu-learned", "runtime": "onnxruntime",
            "budget": {**budget, "held_out": held_out}, "adapters": {"blora": adapter}}


@pytest.mark.parametrize("budget, title, line", [
    ({"measure": "mean_abs_logit", "max": 0.01}, "budget mean_abs_logit ≤ 0.01",
     "a plan must stay within 1.5 × the budget there"),
    ({"max_bytes": 154_504, "measure": "mean_abs_logit"}, "at most 154,504 bytes",
     "of the plans within the bytes, the one with the least mean_abs_logit there is kept"),
])
def test_plan_table_says_how_the_held_out_texts_were_used(budget, title, line, capsys, monkeypatch):
    from loradeploy import render

    monkeypatch.setattr(render.console, "width", 250)
    render.print_plan(_record(budget))
    out = capsys.readouterr().out
    assert title in out and line in out
    assert "mean_abs_logit 0.000265" in out  # the held-out column


@pytest.mark.parametrize("workers, said", [(1, "1 worker)"), (2, "2 workers)")])
def test_the_fleet_line_counts_workers_in_words(workers, said, capsys):
    from loradeploy import render

    unit = {"adapter": "sora", "target": "onnx-cpu", "status": "pass", "ran": True, "bytes": 1000}
    index = {"units": [unit], "summary": {"units": 1, "pass": 1, "fail": 0, "error": 0, "ran": 1, "up_to_date": 0},
             "fleet": {"wall_seconds": 3.2, "executor": "local", "workers": workers}}
    render.print_fleet(index)
    out = capsys.readouterr().out
    assert f"3.2 s (local, {said}" in out and "1 workers" not in out
