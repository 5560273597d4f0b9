"""Does the latency ratio that ``check`` compares hold? For one artifact, run the latency worker
at 1 and 2 threads, on a quiet machine and with a competing CPU-bound process, and print the
fastest call, the fastest run of the runtime's reference unit (repeated to the call's length)
and their ratio, and the median ratio of adjacent pairs — next to the
ratio to the numpy matmul unit that ``check`` used before (it does not run the runtime's
kernels, so it scales differently with threads and with the machine).

    .venv/bin/python benchmarks/latency_reference.py [--artifact OUT] [--runs 20]

Without ``--artifact`` it exports the example SoRA adapter for onnx-cpu into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def numpy_unit_ms(threads: int, repeats: int = 15) -> float:
    """The old reference: a 384×1536 by 1536×384 fp32 matmul chain through numpy's BLAS."""
    code = ("import time, numpy as np\n"
            "rng = np.random.default_rng(0); a = rng.standard_normal((384, 1536), dtype=np.float32)\n"
            "b = rng.standard_normal((1536, 384), dtype=np.float32); t = []\n"
            f"for _ in range({repeats}):\n t0 = time.perf_counter(); (a @ b) @ a; t.append(time.perf_counter() - t0)\n"
            "print(min(t) * 1e3)")
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    import os

    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    return float(out.stdout.strip())


def _burn(stop):
    a = np.random.default_rng(1).standard_normal((512, 512), dtype=np.float32)
    while not stop.is_set():
        a @ a


def worker(artifact: Path, threads: int, runs: int, shape: str) -> dict:
    cmd = [sys.executable, "-m", "loradeploy.runtime.latency_worker", str(artifact), "--shape", shape,
           "--warmup", "3", "--runs", str(runs), "--threads", str(threads)]
    manifest = json.loads((artifact / "manifest.json").read_text())
    adapters = [a["name"] for a in manifest["adapters"] if a.get("file")]
    if adapters:
        cmd += ["--adapter", adapters[0]]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shape", default="1x128")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "sora"
            subprocess.run([str(Path(sys.executable).parent / "loradeploy"), "export", "--base", "minilm", "--adapter",
                            f"sora={REPO / 'examples' / 'adapters' / 'sora'}", "--target", "onnx-cpu", "-o",
                            str(artifact), "--json"], check=True, capture_output=True)
        runtime = json.loads((artifact / "manifest.json").read_text())["target"]["runtime"]
        rows = []
        for load in ("quiet", "busy"):
            stop = mp.Event()
            burner = mp.Process(target=_burn, args=(stop,)) if load == "busy" else None
            if burner:
                burner.start()
                time.sleep(1)
            try:
                for threads in (1, 2):
                    r = worker(artifact, threads, args.runs, args.shape)
                    (label, s), = r["shapes"].items() if len(r["shapes"]) == 1 else list(r["shapes"].items())[:1]
                    np_ms = numpy_unit_ms(threads)
                    rows.append((load, threads, label, s["min_ms"], s["reference_min_ms"], s["min_over_reference"],
                                 s["min_ms"] / np_ms, s["median_pair_ratio"]))
            finally:
                if burner:
                    stop.set()
                    burner.join()
    print(f"artifact: {artifact} ({runtime}); fastest of {args.runs} calls each")
    print(f"{'load':6} {'threads':>7} {'shape':>9} {'call ms':>8} {'unit ms':>8} {'call/unit':>9} "
          f"{'pair median':>11} {'call/numpy':>10}")
    for load, threads, label, call, unit, ratio, np_ratio, pair in rows:
        print(f"{load:6} {threads:>7} {label:>9} {call:8.2f} {unit:8.2f} {ratio:9.3f} {pair:11.3f} {np_ratio:10.3f}")
    by = {(load, t): (ratio, npr) for load, t, _, _, _, ratio, npr, _ in rows}
    print("\nratio change, 1 → 2 threads (quiet): runtime unit "
          f"{by[('quiet', 2)][0] / by[('quiet', 1)][0]:.3f}×, numpy unit {by[('quiet', 2)][1] / by[('quiet', 1)][1]:.3f}×")
    for t in (1, 2):
        print(f"ratio change, quiet → busy ({t} thread{'s' if t > 1 else ''}): runtime unit "
              f"{by[('busy', t)][0] / by[('quiet', t)][0]:.3f}×, numpy unit {by[('busy', t)][1] / by[('quiet', t)][1]:.3f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
