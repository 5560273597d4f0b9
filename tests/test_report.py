"""report.html explains itself: every measure defined, the decisions in words, modules in layer
order, no empty sections (on a real onnx-cpu export of MiniLM + the SoRA example)."""

import copy
import json
import re

import pytest

from loradeploy.measures import describe
from loradeploy.report import render
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters
from loradeploy.job import AdapterSpec


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from loradeploy.evaldata import DEFAULT_EVAL

    root = tmp_path_factory.mktemp("report")
    ev = root / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    return export_adapters("minilm", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")], str(quick_profile(root, "onnx-cpu")),
                           root / "art", mode="swappable", eval_path=ev)


def test_every_measure_of_the_table_is_defined(manifest):
    page = render(manifest)
    measures = {re.sub(r"\[.*\]$", "", c["measure"]) for c in manifest["validation"]["checks"]}
    assert {"label_agreement", "adapter_effect_kept", "latency_p95_ms", "artifact_mb"} <= measures
    for m in measures:
        assert describe(m) and f"<code>{m}</code>: " in page, m
    assert "no description" not in page
    assert describe("pp128_tokens_per_s").startswith("prompt processing speed: tokens of a 128-token prompt")
    assert describe("kl_excess_vs_base") and describe("tg_tokens_per_s_base") and describe("made_up") is None


def test_decisions_are_explained_in_words(manifest):
    page = render(manifest)
    assert "Mode <b>swappable</b>" in page and "36 modules take LoRA inputs" in page
    assert "--slots blocks,norms" in page and "Normalization inputs: 26 normalization weights and biases (LayerNorm, RMSNorm)" in page
    constant = copy.deepcopy(manifest)
    constant["decisions"]["norm_inputs"] = 0
    assert "(none here: an adapter carrying norms is refused)" in render(constant)
    auto = copy.deepcopy(manifest)
    auto["mode"] = "merged"
    failing = {"adapter": "sora", "measure": "max_abs_logit", "value": 0.25, "budget": 0.001, "direction": "<=",
               "status": "FAIL"}
    auto["decisions"]["mode_selection"] = {
        "chosen": "swappable", "rule": "merged if it passes the fidelity budget, else swappable",
        "candidates": {"merged": {"passed": False, "exportable": True, "checks": [failing]},
                       "swappable": {"passed": True, "exportable": True, "checks": []}}}
    page = render(auto)
    assert "Shipped: <b>swappable</b>" in page
    assert "<b>merged</b>: misses the fidelity budget: max_abs_logit 0.25 (budget &lt;= 0.001)" in page
    assert "not shipped" in page


def test_modules_in_layer_order_and_no_empty_sections(manifest):
    lm = copy.deepcopy(manifest)
    lm["task"] = "causal-lm"
    for m in lm["validation"]["metrics"].values():
        m.pop("max_abs_logit_per_class", None)
    lm["adapters"][0]["ranks"] = {f"model.layers.{i}.self_attn.q_proj": [8, 4] for i in (10, 2, 1)}
    page = render(lm)
    assert "Fidelity per class" not in page and "Fidelity per class" in render(manifest)
    order = [page.index(f"model.layers.{i}.self_attn.q_proj") for i in (1, 2, 10)]
    assert order == sorted(order)


def test_the_shipped_eval_set_on_another_base_is_called_out(manifest):
    from loradeploy.evaldata import DEFAULT_EVAL, load_eval, shipped_set_note
    from loradeploy.base import resolve_base

    assert shipped_set_note(load_eval(DEFAULT_EVAL), resolve_base("minilm")) is None
    note = shipped_set_note(load_eval(DEFAULT_EVAL), resolve_base("gemma3-270m"))
    assert "accuracy on it says nothing about this base" in note
    other = copy.deepcopy(manifest)
    other["validation"]["eval_note"] = note
    assert "accuracy on it says nothing about this base" in render(other)
    assert json.dumps(manifest["validation"]).count("eval_note") == 1 and manifest["validation"]["eval_note"] is None


def test_the_terminal_names_the_eval_set(manifest, capsys, monkeypatch):
    from pathlib import Path

    from loradeploy.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at the terminal's width: the long tmp path stays on one line
    art = Path(manifest["artifact"])
    ev = Path(manifest["validation"]["eval_file"])
    assert main(["validate", str(art), "--eval", str(ev)]) == 0
    out = capsys.readouterr().out
    assert f"eval set: {ev} (16 inputs)" in out.splitlines(), out


def test_the_plan_plot_shows_the_uniform_plans_beside_the_learned_one():
    from loradeploy.report import plan_svg

    plan = {"budget": {"measure": "mean_abs_logit", "max": 0.01}, "bytes": 3000,
            "checked_plans": [{"bytes": 5000, "mean_abs_logit": 0.001}, {"bytes": 3000, "mean_abs_logit": 0.004}],
            "uniform_plans": [{"plan": "uniform fp32", "bytes": 8000, "mean_abs_logit": 0.0},
                              {"plan": "uniform int8", "bytes": 2000, "mean_abs_logit": 0.02}],
            "peft_conversion": [{"plan": "PEFT convert_to_lora(0.9)", "threshold": 0.9, "bytes": 2500,
                                 "mean_abs_logit": 0.03}],
            "measured_pytorch": {"mean_abs_logit": 0.004}}
    svg = plan_svg({"name": "sora", "plan": plan}, {"mean_abs_logit": 0.0041})
    assert ">uniform int8<" in svg and ">uniform fp32<" in svg and ">chosen (PyTorch)<" in svg
    assert ">PEFT 0.9<" in svg
    assert svg.count('fill="#2a2"') == 2
    plan.pop("uniform_plans")  # plans written before these were recorded still draw
    plan.pop("peft_conversion")
    svg = plan_svg({"name": "sora", "plan": plan}, None)
    assert "uniform" not in svg and "PEFT" not in svg and ">chosen (PyTorch)<" in svg


def test_the_held_out_check_is_said_in_words():
    from loradeploy.report import held_out_sentence

    plan = {"budget": {"measure": "mean_abs_logit", "max": 0.01}, "bytes": 40_248,
            "held_out": {"texts": 512, "slack": 1.5, "measured": {"mean_abs_logit": 0.01155},
                         "backed_off_from": 38_160}}
    text = held_out_sentence(plan)
    assert "On 512 held-out texts" in text and "mean_abs_logit 0.01155" in text and "1.5 × the budget 0.01" in text
    assert "plan of 38,160 bytes did not hold there, so it backed off to 40,248 bytes" in text
    plan["held_out"]["backed_off_from"] = None
    assert "backed off" not in held_out_sentence(plan)
    plan["budget"] = {"max_bytes": 50_000, "measure": "mean_abs_logit"}  # a byte budget: the plans compared there
    text = held_out_sentence(plan)
    assert "1.5 × the budget" not in text and "mean_abs_logit 0.01155" in text
    assert "of the plans within 50,000 bytes it has the least mean_abs_logit there" in text
    plan["budget"] = {"max_bytes": 50_000}  # written before a byte budget recorded its measure
    assert held_out_sentence(plan).endswith("the plan was measured; see the raw decisions.")


def test_the_slot_decisions_are_folded_under_a_count(manifest):
    """A Gemma-sized slot list (126 modules) and the raw decisions stay folded, so the page one
    sees is the validation table and how the artifact was made."""
    gemma = copy.deepcopy(manifest)
    slots = {f"model.layers.{i}.{m}": [640, 1024] for i in range(18) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")}
    gemma["decisions"].update(lora_slots=len(slots), lora_slot_modules=slots)
    page = render(gemma)
    seen = re.sub(r"<details>.*?</details>", "", page, flags=re.S)  # what shows until a fold is opened
    assert "model.layers.17.mlp.down_proj" in page and "model.layers.17.mlp.down_proj" not in seen
    assert "<summary>the 126 slot modules (in, out features)</summary>" in page
    assert re.search(r"<summary>\d+ keys as recorded in manifest.json \(entries: [^)]*lora_slot_modules 126", page)
    assert "<h2>Validation</h2>" in seen and "<h2>How this artifact was made</h2>" in seen
    assert "label_agreement" in seen and "126 modules take LoRA inputs" in seen
    assert len(seen) < len(page) / 2
    order = [page.index(f"<td>model.layers.{i}.self_attn.q_proj</td>") for i in (1, 2, 10)]
    assert order == sorted(order)  # the slot table in layer order
