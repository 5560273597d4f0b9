"""The bad-input corpus (tests/bad_inputs): one clear line naming the file, exit 2, no
traceback, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import assert_bad_input, main_bad_input

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
    assert case["exit_code"] == 2
    line = main_bad_input(capsys, _argv(case, command, out), case["expect"])
    folder = CORPUS / "cases" / case["name"]
    named = Path(line.removeprefix("error: ").split(": ", 1)[0])  # the file or folder is named first
    assert named in {folder, folder / case["target"], *(folder.iterdir() if folder.is_dir() else ())}, line
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
    assert_bad_input(proc.returncode, proc.stderr, case["expect"], out=proc.stdout)
    assert list(tmp_path.iterdir()) == []


def _good_adapter(tmp_path):
    from tests.support.synthetic import make_sora

    return make_sora(tmp_path / "good").path


def test_unwritable_output(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    main_bad_input(capsys, ["prune", str(src), "-o", str(blocker / "out")], "cannot write here", str(blocker))


def test_output_is_a_file(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    (tmp_path / "f").write_text("x")
    main_bad_input(capsys, ["prune", str(src), "-o", str(tmp_path / "f")], "is a file", "loradeploy prune --help")  # click's own check of -o


def test_bad_option_values(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    main_bad_input(capsys, ["inspect", str(src), "--tolerance", "2"], "--tolerance", "got 2.0")
    main_bad_input(capsys, ["inspect", str(src), "--format", "nope"], "nope")
    main_bad_input(capsys, ["inspect", str(src), "--lora-alpha", "-1"], "lora-alpha must be a positive number")


def test_wrong_format_override(tmp_path, capsys):
    src = _good_adapter(tmp_path)
    main_bad_input(capsys, ["inspect", str(src), "--format", "increlora"], str(src))
