"""Mistakes in an ``export`` command line: one ``error:`` line, exit 2, nothing left behind —
with the closest name suggested, found before the adapters are read, and no folder made for
``-o`` kept when the export fails."""

import pytest

from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS

ADAPTER = EXAMPLE_ADAPTERS / "sora"


def base_alias_typo(tmp):
    return ["--base", "minlm", "--adapter", str(ADAPTER)], \
        "error: minlm: not a model folder or a built-in base (built-in: minilm, gemma3-270m); did you mean 'minilm'?"


def base_before_adapters(tmp):
    """The adapter does not exist either: the base is named, so it was checked first."""
    return ["--base", "minilm-l12", "--adapter", str(tmp / "no-adapter")], "error: minilm-l12: not a model folder"


def mode_typo(tmp):
    return ["--base", "minilm", "--adapter", str(ADAPTER), "--mode", "swapable"], \
        "error: mode 'swapable' is not one of merged, swappable, auto; did you mean 'swappable'?"


def failure_after_the_output_folder(tmp):
    """The eval set fails once the base is loaded, after the folders for -o were made."""
    (tmp / "eval.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": 3}\n')
    return ["--base", "minilm", "--adapter", str(ADAPTER), "--eval", str(tmp / "eval.jsonl")], "eval.jsonl:2"


CASES = [base_alias_typo, base_before_adapters, mode_typo, failure_after_the_output_folder]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_mistake_is_one_line_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORADEPLOY_DEBUG", raising=False)
    args, expected = case(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "new" / "parents" / "out"
    line = main_bad_input(capsys, ["export", *args, "--target", "onnx-cpu", "-o", str(out)])
    assert line.startswith(expected) if expected.startswith("error: ") else expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even an empty parent of -o


def test_a_mistyped_base_costs_no_adapter_reading(tmp_path, capsys):
    """Also in `quantize`: the base is resolved before the adapters are read."""
    err = main_bad_input(capsys, ["quantize", "--base", "gemma3", "--adapter", str(tmp_path / "no-adapter"), "--target",
                                  "onnx-cpu", "-o", str(tmp_path / "plan.json")])
    assert err == "error: gemma3: not a model folder or a built-in base (built-in: minilm, " \
                                "gemma3-270m); did you mean 'gemma3-270m'?"
