"""benchmarks/export_time.py, scaled down (16 eval texts, one short timing shape): the stages it
reads from an export's progress lines add up to the export's wall time, and the fleet unit it
divides by is a warm one."""

import json
import subprocess
import sys

import pytest

from benchmarks import export_time as bench
from tests.support.paths import REPO
from tests.support.profiles import quick_profile


def test_stage_lines_are_read_by_stage():
    lines = ["[14:36:00 +   0.0s] reading and pruning 1 adapter(s) …",
             "[14:36:00 +   0.6s] done: read and pruned adapters (0.6 s)",
             "[14:36:08 +   8.3s] done: loaded base model (sequence-classification) (7.7 s)",
             "[14:36:20 +  20.4s] done: computed fp32 reference (7.9 s)",
             "[14:36:23 +  23.0s] done: fidelity sora (2.6 s)", "[14:36:25 +  25.0s] done: fidelity blora (2.0 s)",
             "[14:36:58 +  58.3s] done: validated (35.3 s)", "error: something (not a stage)"]
    assert bench.stage_seconds(lines) == {"read adapters": 0.6, "load base": 7.7, "fp32 reference": 7.9,
                                          "fidelity": 4.6, "latency": 35.3}


@pytest.mark.slow
def test_the_benchmark_runs_small(tmp_path):
    from loradeploy.evaldata import DEFAULT_EVAL

    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    profile = quick_profile(tmp_path, "onnx-cpu")
    done = subprocess.run([sys.executable, "benchmarks/export_time.py", "--runs", "1", "--target", str(profile),
                           "--eval", str(ev), "--json"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-800:]
    r = json.loads(done.stdout)
    (run,) = r["exports"]
    assert {"start-up", "read adapters", "load base", "export graph", "fp32 reference", "fidelity",
            "latency"} <= set(run["stages_s"])
    # every second of the run is in a stage but what follows the last line (writing the report)
    assert 0 <= run["wall_s"] - sum(run["stages_s"].values()) < 0.25 * run["wall_s"]
    assert 0 < r["fleet_unit_s"] < r["export_s"]  # warm: no imports, no base load
    assert r["export_over_fleet_unit"] == pytest.approx(r["export_s"] / r["fleet_unit_s"])
