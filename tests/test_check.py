"""verify and check on real artifacts: a changed byte fails verify naming the file; a
regressed artifact (a lower-precision plan than the baseline's) fails check with the measure
named in JUnit and Markdown; the untouched artifact passes."""

import json
import xml.etree.ElementTree as ET

import pytest

from loradeploy.cli import main
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from loradeploy.evaldata import DEFAULT_EVAL

    root = tmp_path_factory.mktemp("check")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:48]) + "\n")
    profile = quick_profile(root, "onnx-cpu-learned", warmup=1, runs=5, shapes=[{"batch": 1, "seq": 32}],
                            latency_budget=True, filename="profile.yaml")
    arts = {}
    for name, plan in (("baseline", "uniform:8"), ("regressed", "uniform:4")):
        arts[name] = root / name
        main(["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}", "--target",
              str(profile), "--plan", plan, "--eval", str(eval_file), "-o", str(arts[name]), "--json"])
    return root, arts, eval_file


def test_untouched_artifact_passes_against_its_own_manifest(setup, capsys):
    root, arts, eval_file = setup
    junit, md = root / "ok.xml", root / "ok.md"
    # latency: a ratio to a reference unit timed in the same process; the slack is wide here
    # because CI machines run other jobs (±3% quiet, up to +55% with a competing job, measured)
    code = main(["check", str(arts["baseline"]), "--baseline", str(arts["baseline"] / "manifest.json"), "--eval",
                 str(eval_file), "--junit", str(junit), "--markdown", str(md), "--tolerance", "latency=1.5", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["passed"] and record["regressions"] == []
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 5
    kinds = {r["kind"] for r in record["rows"] if r["status"] == "PASS"}
    assert kinds == {"fidelity", "size", "latency"}  # same machine: latency compared
    fp = record["validation"]["latency"]["fingerprint"]
    assert fp["runtime"] == "onnxruntime" and fp["runtime_version"] and fp["isa"]
    assert "no regression" in md.read_text()


def test_lower_precision_plan_is_a_regression(setup, capsys):
    """The int8 baseline as if written on another machine (foreign fingerprint): latency is not
    compared, the int4 adapter's fidelity regression still fails."""
    root, arts, eval_file = setup
    junit, md = root / "bad.xml", root / "bad.md"
    foreign = json.loads((arts["baseline"] / "manifest.json").read_text())
    foreign["validation"]["latency"]["fingerprint"].update(cpu_model="Some Other CPU", isa="x86-64-v3")
    (root / "foreign.json").write_text(json.dumps(foreign))
    code = main(["check", str(arts["regressed"]), "--baseline", str(root / "foreign.json"), "--eval", str(eval_file),
                 "--junit", str(junit), "--markdown", str(md), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 1 and not record["passed"]
    assert "sora/mean_abs_logit" in record["regressions"]
    assert {r["status"] for r in record["rows"] if r["kind"] == "latency"} == {"INFO"}
    failures = {c.get("name"): c.find("failure") for c in ET.parse(junit).getroot().iter("testcase")}
    assert failures["sora/mean_abs_logit"] is not None
    assert "sora/mean_abs_logit regressed" in failures["sora/mean_abs_logit"].get("message")
    assert failures["artifact_bytes"] is None  # smaller, so not a regression
    text = md.read_text()
    assert "| sora/mean_abs_logit |" in text and "**FAIL**" in text and "regression: " in text


def test_verify_passes_then_names_a_changed_byte(setup, capsys):
    root, arts, _ = setup
    assert main(["verify", str(arts["baseline"])]) == 0
    assert "match the manifest" in capsys.readouterr().out
    target = arts["baseline"] / "adapters" / "sora.onnx_adapter"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    try:
        assert main(["verify", str(arts["baseline"])]) == 1
        assert "adapters/sora.onnx_adapter" in capsys.readouterr().out
    finally:
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))


def test_examples_ci_script_passes_against_the_committed_baseline(tmp_path):
    """examples/ci/check.sh: export the example adapter, verify, check against
    examples/ci/baseline/manifest.json (exported on the development machine)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.paths import REPO

    env = {**os.environ, "LORADEPLOY": str(Path(sys.executable).parent / "loradeploy"),
           "OUT": str(tmp_path / "art"), "REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run(["bash", str(REPO / "examples" / "ci" / "check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (tmp_path / "reports" / "loradeploy-check.xml").is_file()
    assert "no regression" in (tmp_path / "reports" / "loradeploy-check.md").read_text()
