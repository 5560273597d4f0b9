"""Latency worker: ``python -m loradeploy.latency ARTIFACT --runtime R [--adapter A]
--shape BxS …`` loads the artifact in this fresh process (only the runtime, no PyTorch model),
times each shape after warm-up, and prints JSON with p50/p95 per shape and peak RSS."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """Peak RSS of this process image. ``VmHWM`` is reset by exec; ``ru_maxrss`` is not (it
    would report the parent's size after fork+exec), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


class _Reference:
    """A fixed unit of work (fp32 matmuls through numpy's BLAS) timed next to each run."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((384, 1536), dtype=np.float32)
        self.b = rng.standard_normal((1536, 384), dtype=np.float32)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        (self.a @ self.b) @ self.a
        return (time.perf_counter() - t0) * 1e3


def time_runner(runner, adapter, batch: int, seq: int, warmup: int, runs: int, vocab: int = 1000) -> dict:
    """p50/p95 of ``runs`` calls, and the fastest call over the fastest reference unit, the two
    interleaved: minima are what background load disturbs least, and interleaving gives both
    the same chances."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 1000 + vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    reference = _Reference()
    for _ in range(warmup):
        reference()
        runner.run(ids, mask, adapter)
    samples, refs = [], []
    for _ in range(runs):
        refs.append(reference())
        t0 = time.perf_counter()
        runner.run(ids, mask, adapter)
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": _percentile(samples, 50), "p95_ms": _percentile(samples, 95),
            "mean_ms": float(np.mean(samples)), "min_ms": min(samples), "samples_ms": samples,
            "min_over_reference": min(samples) / min(refs)}


def reference_workload_ms(repeats: int = 15) -> float:
    """Median time of the reference unit (a 384×1536 by 1536×384 fp32 matmul chain through
    numpy's BLAS) in the process that measures an artifact: ``check`` compares latency as a
    ratio to it, so a slower or busier machine does not read as a regression."""
    unit = _Reference()
    return _percentile([unit() for _ in range(repeats)], 50)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loradeploy.latency")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--shape", action="append", required=True, help="BATCHxSEQ")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from .targets.common import get_target

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    t0 = time.perf_counter()
    runner = get_target(args.runtime).open(args.artifact, manifest, threads=args.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    parsed = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shape]
    before = reference_workload_ms()
    if hasattr(runner, "measure"):  # runtimes with their own notion of throughput (llama.cpp)
        result = runner.measure(args.adapter, parsed, args.warmup, args.runs)
    else:
        result = {"shapes": {f"b{b}xs{s}": time_runner(runner, args.adapter, b, s, args.warmup, args.runs)
                             for b, s in parsed}}
    reference = float(np.median([before, reference_workload_ms()]))
    print(json.dumps({"load_ms": load_ms, **result, "peak_rss_mb": peak_rss_mb(), "reference_workload_ms": reference}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
