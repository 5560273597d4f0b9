"""An export killed mid-way (SIGKILL: no clean-up runs) leaves no OUT; its hidden temporary
folder is removed by the next write of OUT, which succeeds."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.paths import EXAMPLE_ADAPTERS

pytestmark = pytest.mark.slow


def _export_cmd(out, eval_file):
    return [sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter",
            f"sora={EXAMPLE_ADAPTERS / 'sora'}", "--target", "onnx-cpu", "--eval", str(eval_file), "-o", str(out),
            "--json"]


def test_sigkill_mid_export_leaves_no_artifact(tmp_path):
    from loradeploy.evaldata import DEFAULT_EVAL

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "art"
    proc = subprocess.Popen(_export_cmd(out, eval_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    partial = []
    while time.time() < deadline and proc.poll() is None:  # kill once the graph is being written
        partial = [p for p in tmp_path.glob(".art.partial-*") if any(p.rglob("*.onnx"))]
        if partial:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partial and all(p.is_dir() for p in partial)  # left behind: SIGKILL runs no clean-up
    rerun = subprocess.run(_export_cmd(out, eval_file), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".art.partial-*")), "the stale temporary folder was not removed"
