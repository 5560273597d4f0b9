"""benchmarks/onnx_web.py, scaled down (2 rounds) on the tests' bundles: every ratio it reports is
measured (positive, finite), the wasm run's outputs are the bundle's, and the int8 bundle is set
beside the fp32 one (bytes, fidelity, wasm time)."""

import json
import math
import subprocess
import sys

import pytest

from tests.support.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_benchmark_runs_small(web_bundle, web_int8_bundle):
    folder, record = web_bundle
    int8_folder, int8_record = web_int8_bundle
    done = subprocess.run([sys.executable, "benchmarks/onnx_web.py", "--bundle", str(folder), "--rounds", "2",
                           "--int8-bundle", str(int8_folder), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=500)
    assert done.returncode == 0, done.stderr[-800:]
    r = json.loads(done.stdout)
    for key in ("wasm_over_ort_cpu_p50", "open_over_adapter_load", "wasm_p50_ms", "ort_cpu_p50_ms",
                "swappable_over_merged_wasm_p50", "kernel_matmul_wasm_over_ort_cpu_p50"):
        assert 0 < r[key] < math.inf, key
    assert r["wasm_vs_ort_cpu_max_abs"] < 1e-4 and r["merged_vs_swappable_max_abs"] < 1e-4
    assert r["fidelity"]["sora"]["max_abs_logit"] == record["validation"]["metrics"]["sora"]["max_abs_logit"]
    int8 = r["int8"][int8_folder.name]
    fp32_bytes, int8_bytes = (rec["validation"]["artifact_bytes"] for rec in (record, int8_record))
    assert int8["over_fp32_bytes"] == int8_bytes / fp32_bytes
    assert int8["token_embedding"] == int8_record["decisions"]["token_embedding"]
    metrics = int8_record["validation"]["metrics"]["increlora"]
    assert int8["fidelity"]["increlora"]["max_abs_logit"] == metrics["max_abs_logit"]
    assert 0 < int8["wasm_p50_ms"] < math.inf and 0 < int8["over_fp32_wasm_p50"] < math.inf
