"""benchmarks/onnx_web.py, scaled down (2 rounds) on the tests' bundle: every ratio it reports is
measured (positive, finite) and the wasm run's outputs are the bundle's."""

import json
import math
import subprocess
import sys

import pytest

from tests.support.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_benchmark_runs_small(web_bundle):
    folder, record = web_bundle
    done = subprocess.run([sys.executable, "benchmarks/onnx_web.py", "--bundle", str(folder), "--rounds", "2",
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=500)
    assert done.returncode == 0, done.stderr[-800:]
    r = json.loads(done.stdout)
    for key in ("wasm_over_ort_cpu_p50", "open_over_adapter_load", "wasm_p50_ms", "ort_cpu_p50_ms",
                "swappable_over_merged_wasm_p50", "kernel_matmul_wasm_over_ort_cpu_p50"):
        assert 0 < r[key] < math.inf, key
    assert r["wasm_vs_ort_cpu_max_abs"] < 1e-4 and r["merged_vs_swappable_max_abs"] < 1e-4
    assert r["fidelity"]["sora"]["max_abs_logit"] == record["validation"]["metrics"]["sora"]["max_abs_logit"]
