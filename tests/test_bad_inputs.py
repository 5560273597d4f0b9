"""The bad-input corpus (tests/bad_inputs): one clear line naming the file, exit 2, no
traceback, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loradeploy.cli import main
from tests.support.cli import error_text

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = json.loads((CORPUS / "cases.json").read_text())
PARAMS = [(c, cmd) for c in CASES for cmd in c["commands"]]


def _argv(case, command, out):
    target = CORPUS / "cases" / case["name"] / case["target"]
    extra = [a.replace("{case}", str(CORPUS / "cases" / case["name"])) for a in case.get("extra_args", [])]
    argv = [command, str(target), *extra]
    return argv + (["-o", str(out)] if command == "prune" else [])


@pytest.mark.parametrize("case,command", PARAMS, ids=[f"{c['name']}-{cmd}" for c, cmd in PARAMS])
def test_bad_input(case, command, tmp_path, capsys):
    marker = case.get("marker")
    if marker and os.path.exists(marker):
        os.remove(marker)
    out = tmp_path / "out"
    code = main(_argv(case, command, out))
    captured = capsys.readouterr()
    lines = error_text(captured.err).splitlines()
    assert code == case["exit_code"]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert case["expect"] in lines[0]
    assert case["name"] in lines[0] or "not_a_head" in lines[0]  # the file or folder is named
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing (half-)written
    if marker:
        assert not os.path.exists(marker), "the pickle payload ran"


def test_corpus_is_large_enough():
    assert len(PARAMS) >= 50


@pytest.mark.parametrize("name", ["malicious_pickle", "truncated_safetensors"])
def test_bad_input_end_to_end_subprocess(name, tmp_path):
    case = next(c for c in CASES if c["name"] == name)
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", *_argv(case, "prune", tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = error_text(proc.stderr)
    assert err.count("\n") == 0 and err.startswith("error: "), proc.stderr
    assert case["expect"] in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _good_adapter(tmp_path):
    from tests.support.synthetic import make_sora

    return make_sora(tmp_path / "good").path


def test_unwritable_output(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", str(src), "-o", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot write here" in err and str(blocker) in err


def test_output_is_a_file(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    (tmp_path / "f").write_text("x")
    assert main(["prune", str(src), "-o", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err  # click's own check of -o


def test_bad_option_values(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    assert main(["inspect", str(src), "--tolerance", "2"]) == 2
    assert main(["inspect", str(src), "--format", "nope"]) == 2
    assert main(["inspect", str(src), "--lora-alpha", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lora-alpha must be a positive number" in err


def test_wrong_format_override(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    assert main(["inspect", str(src), "--format", "increlora"]) == 2
    assert "error:" in capsys.readouterr().err
