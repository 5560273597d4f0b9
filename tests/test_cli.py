import json

import pytest

from loradeploy.cli import main
from tests.synthetic import make_blora, make_sora
from tests.conftest import error_text


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "prune" in out


def test_inspect_json(tmp_path, capsys):
    syn = make_blora(tmp_path / "b")
    assert main(["inspect", str(syn.path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "blora"
    ranks = {m["name"]: (m["rank_before"], m["rank_after"]) for m in record["modules"]}
    assert ranks == {n: (8, live) for n, live in syn.live_ranks.items()}
    assert record["totals"]["exact"] is True
    assert record["sources"][0]["sha256"]


def test_inspect_table(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    assert main(["inspect", str(syn.path)]) == 0
    out = capsys.readouterr().out
    assert "format: sora" in out and "rank 40 → 20" in out


def test_prune_writes_peft_folder(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["prune", str(syn.path), "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "prune_report.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {
        n: r for n, r in syn.live_ranks.items() if r}
    assert record["totals"]["rank_after"] == sum(syn.live_ranks.values())
    # the output is itself a readable adapter, with nothing left to prune
    assert main(["inspect", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["method"] == "peft-lora" and again["totals"]["rank_before"] == again["totals"]["rank_after"]


def test_prune_overwrite(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["prune", str(syn.path), "-o", str(out)]) == 0
    assert main(["prune", str(syn.path), "-o", str(out)]) == 2
    assert main(["prune", str(syn.path), "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s"]


def test_an_internal_error_is_exit_3_with_one_line_naming_the_command(monkeypatch, capsys, tmp_path):
    """A bug (an unexpected exception) must not look like a failed validation (exit 1)."""
    import loradeploy.verify
    from loradeploy.cli import INTERNAL_ERROR, main

    def boom(*_a, **_k):
        raise KeyError("causal-lm")

    monkeypatch.setattr(loradeploy.verify, "verify", boom)
    monkeypatch.delenv("LORADEPLOY_DEBUG", raising=False)
    code = main(["verify", str(tmp_path)])
    out = capsys.readouterr()
    lines = error_text(out.err).splitlines()
    assert code == INTERNAL_ERROR == 3
    assert len(lines) == 1 and "internal error in `loradeploy verify`: KeyError: 'causal-lm'" in lines[0]
    assert "LORADEPLOY_DEBUG=1" in lines[0] and "Traceback" not in out.err + out.out
    monkeypatch.setenv("LORADEPLOY_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["verify", str(tmp_path)])


def test_a_known_error_line_hints_at_the_traceback(capsys, tmp_path):
    from loradeploy.cli import main

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = error_text(capsys.readouterr().err)
    assert err.startswith("error: ") and err.endswith("(LORADEPLOY_DEBUG=1 shows the traceback)")


def test_progress_shows_as_it_happens_in_a_pipe(tmp_path):
    """With stderr piped (a CI log), each stage is a timestamped line printed when it begins or
    ends, not at the end; stdout (here --json) stays the result alone."""
    import json
    import re
    import subprocess
    import sys
    import time

    from tests.conftest import EXAMPLE_ADAPTERS, quick_profile

    from loradeploy.evaldata import DEFAULT_EVAL

    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:32]) + "\n")
    argv = [sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter",
            str(EXAMPLE_ADAPTERS / "sora"), "--target", str(quick_profile(tmp_path, "onnx-cpu")), "--eval", str(ev),
            "-o", str(tmp_path / "out"), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrived = []
    for line in proc.stderr:
        arrived.append((time.monotonic(), line.rstrip("\n")))
    out = proc.stdout.read()
    end = time.monotonic()
    assert proc.wait() == 0
    assert json.loads(out)["validation"]["passed"]
    lines = [text for _, text in arrived]
    stamp = re.compile(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d+s\] ")
    assert lines and all(stamp.match(ln) for ln in lines), lines
    stages = [stamp.sub("", ln) for ln in lines]
    begins = [s for s in stages if s.endswith(" …")]
    assert any(s.startswith("exporting the swappable artifact for onnx-cpu") for s in begins)
    assert any(s.startswith("computing the fp32 PyTorch reference on 32 eval inputs") for s in begins)
    assert any(s.startswith(f"done: eval set {ev} (32 inputs)") for s in stages)
    first = {key: next(i for i, s in enumerate(stages) if s.startswith(key))
             for key in ("exporting the swappable", "done: exported swappable artifact", "measuring latency", "done: validated")}
    assert first["exporting the swappable"] < first["done: exported swappable artifact"] < first["measuring latency"] \
        < first["done: validated"]
    # printed as it happened: the first line reached the pipe well before the command ended
    assert end - arrived[0][0] > 2.0
