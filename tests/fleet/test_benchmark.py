"""benchmarks/fleet.py, scaled down: the adapters it derives are distinct PEFT adapters whose
ΔW is the example's scaled, and its RSS sampler counts a child process."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import fleet as bench
from loradeploy.adapters import ReadOptions, read_adapter
from loradeploy.prune import prune
from tests.support.paths import EXAMPLE_ADAPTERS, REPO


def test_derived_adapters_scale_the_examples(tmp_path):
    derived = bench.derive(tmp_path, 4)
    assert list(derived) == ["sora-0", "increlora-0", "blora-0", "sora-1"]
    sora = prune(read_adapter(EXAMPLE_ADAPTERS / "sora", None,
                              ReadOptions(head=EXAMPLE_ADAPTERS / "sora" / "head.safetensors")))[0]
    for name, factor in (("sora-0", 0.6), ("sora-1", 0.7)):
        got = read_adapter(derived[name])
        assert got.method.value == "peft-lora"
        for m, mod in sora.modules.items():
            want = mod.scale * mod.lora_B @ mod.lora_A * factor
            have = got.modules[m].scale * got.modules[m].lora_B @ got.modules[m].lora_A
            assert torch.allclose(have, want, rtol=1e-5, atol=1e-7)
        assert set(got.extra_tensors) == set(sora.extra_tensors)  # the head travels along


def test_tree_rss_counts_children():
    code = "import time; b = bytearray(300 << 20); time.sleep(3)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"])
    rss = bench.TreeRSS(parent.pid)
    parent.wait()
    time.sleep(0.1)
    assert rss.stop() > 300 << 20  # the child's 300 MB, not only the parent's few


def test_process_start_imports_run():
    """The benchmark's process-start floor imports modules that exist (a renamed module fails it)."""
    done = subprocess.run([sys.executable, "-c", bench.START_IMPORTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


@pytest.mark.slow
def test_the_benchmark_runs_small():
    """The whole benchmark on 2 adapters (no Ray): each re-run redoes only the adapter it changed,
    the second one in the resident worker, which it stops at the end."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="ldb-"))  # short: the worker's socket path must stay under 108 bytes
    try:
        done = subprocess.run([sys.executable, "benchmarks/fleet.py", "--adapters", "2", "--separate", "1",
                               "--no-ray", "--json"], capture_output=True, text=True, cwd=REPO, timeout=1200,
                              env={**os.environ, "TMPDIR": str(tmp)})
        assert done.returncode == 0, done.stderr[-800:]
        rows = json.loads(done.stdout)
        assert rows["re-run after one change, fresh process, s"]["note"] == "ran: onnx-cpu/sora-0"
        assert rows["re-run after one change, resident worker, s"]["note"] == \
               "ran: onnx-cpu/increlora-0, in the worker: yes"
        work = next(tmp.glob("loradeploy-fleet-bench-*"))
        assert not (work / "worker.sock").exists()  # stopped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
