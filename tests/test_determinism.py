"""Deterministic export: the same inputs and options give byte-identical artifact files (equal
sha256 for every file) and equal reproducible manifest parts, for each shipped example on each
target family."""

import pytest

from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters as export
from loradeploy.manifest import reproducible
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

pytestmark = pytest.mark.slow
# every shipped example on every target family; examples sharing a target go into one artifact
# (one export per run instead of one per example, and the order of adapters in it is checked too)
# (bnb-nf4 is `auto`: one adapter is validated merged and swappable, several are swappable)
CASES = [("onnx-cpu", ("sora", "increlora", "blora")), ("onnx-cpu-int8", ("sora",)),
         ("onnx-cpu-learned", ("increlora",)), ("bnb-nf4", ("sora",)), ("bnb-nf4", ("increlora", "blora")),
         ("bnb-int8", ("blora",)), ("gguf-cpu", ("sora-gemma", "increlora-gemma"))]


@pytest.mark.parametrize("target,examples", CASES, ids=[f"{t}-{'+'.join(e)}" for t, e in CASES])
def test_two_exports_are_byte_identical(tmp_path, target, examples):
    from loradeploy.evaldata import DEFAULT_EVAL, DEFAULT_LM_EVAL

    lm = target.startswith("gguf")
    eval_file = tmp_path / ("eval.txt" if lm else "eval.jsonl")
    source = DEFAULT_LM_EVAL if lm else DEFAULT_EVAL
    eval_file.write_text("\n".join(source.read_text().splitlines()[:4 if lm else 16]) + "\n")
    base = "gemma3-270m" if lm else "minilm"
    profile = str(quick_profile(tmp_path, target))
    calibration = None
    if target.endswith("-learned"):  # 64 calibration texts and 64 held out (the default holds out 512)
        from loradeploy.evaldata import DEFAULT_CALIBRATION

        calibration = tmp_path / "calibration.jsonl"
        calibration.write_text("\n".join(DEFAULT_CALIBRATION.read_text().splitlines()[:128]) + "\n")
    specs = [AdapterSpec(e, EXAMPLE_ADAPTERS / e) for e in examples]
    runs = [export(base, specs, profile, tmp_path / f"run{i}", eval_path=eval_file, calibration=calibration)
            for i in (1, 2)]
    files = [{f["path"]: f["sha256"] for f in r["files"]} for r in runs]
    assert files[0] == files[1]
    assert len(files[0]) >= 1 + len(examples)  # the base (or merged model) and each adapter's file
    for r in runs:  # the manifest lists exactly what is on disk
        on_disk = {p.relative_to(tmp_path / f"run{runs.index(r) + 1}").as_posix()
                   for p in (tmp_path / f"run{runs.index(r) + 1}").rglob("*") if p.is_file()}
        assert on_disk == set(files[0]) | {"manifest.json", "report.html"}
    assert reproducible(runs[0]) == reproducible(runs[1])
    if calibration is not None:
        assert runs[0]["adapters"][0]["plan"]["held_out"]["texts"] == 64
