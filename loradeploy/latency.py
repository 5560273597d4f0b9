"""Latency worker: ``python -m loradeploy.latency ARTIFACT [--adapter A]
--shape BxS …`` loads the artifact in this fresh process (only the runtime, no PyTorch model),
times each shape after warm-up, interleaved with the runtime's fixed reference unit, and prints
JSON with p50/p95 and the fastest call over the fastest reference per shape, peak RSS, and the
fingerprint (CPU, ISA level, runtime version, threads) that a latency comparison must match."""

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


class ScaledReference:
    """The runtime's reference unit, run back to back until the block lasts as long as the call
    it is compared with: a short unit finds an undisturbed slot on a busy machine far more often
    than a long call does, so minima of unequal lengths drift apart under load (measured: 3 ms
    unit vs 32 ms call, ratio ×2.7 with one competing process). The block is bounded by time, not
    by a count, so a slowed-down unit cannot make it run longer than the call."""

    def __init__(self, unit, call_ms: float):
        self.unit, self.call_ms = unit, call_ms
        self.repeats = 0  # units in the last block

    def __call__(self) -> float:
        """ms per unit over one block of about ``call_ms``."""
        total, n = 0.0, 0
        while n == 0 or total < self.call_ms:
            total += self.unit()
            n += 1
        self.repeats = n
        return total / n


def ratio_stats(samples: list[float], refs: list[float], repeats: int) -> dict:
    """The fastest call over the fastest reference block, and the median ratio of adjacent pairs."""
    return {"reference_min_ms": min(refs), "reference_repeats": repeats,
            "min_over_reference": min(samples) / min(refs),
            "median_pair_ratio": float(np.median(np.asarray(samples) / np.asarray(refs)))}


def time_calls(fn, warmup: int, runs: int) -> list[float]:
    """ms of each of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def stats(samples: list[float]) -> dict:
    return {"p50_ms": _percentile(samples, 50), "p95_ms": _percentile(samples, 95),
            "mean_ms": float(np.mean(samples)), "min_ms": float(min(samples)),
            "samples_ms": [float(x) for x in samples]}


def time_session(session, adapter, batch: int, seq: int, warmup: int, runs: int, unit,
                 vocab: int = 1000) -> dict:
    """p50/p95 of ``runs`` calls, and their ratio to the runtime's reference unit (scaled to the
    call's length, see :class:`ScaledReference`), the two interleaved call by call: minima are
    what background load disturbs least, and interleaving gives both the same chances."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 1000 + vocab, size=(batch, seq), dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    warm = []
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        session.run(inputs, adapter)
        warm.append((time.perf_counter() - t0) * 1e3)
    reference = ScaledReference(unit, min(warm))
    samples, refs = [], []
    for _ in range(runs):
        refs.append(reference())
        t0 = time.perf_counter()
        session.run(inputs, adapter)
        samples.append((time.perf_counter() - t0) * 1e3)
    return {**stats(samples), **ratio_stats(samples, refs, reference.repeats)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loradeploy.latency")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--adapter")
    ap.add_argument("--shape", action="append", required=True, help="BATCHxSEQ")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    return ap


def measure(argv: list[str]) -> dict:
    """Open the artifact, time its shapes, close it: the JSON record the worker prints."""
    from . import registry, runtime
    from .machine import fingerprint

    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    session = runtime.open(args.artifact, threads=args.threads, workers=1)
    load_ms = (time.perf_counter() - t0) * 1e3
    spec = registry.get(session.runtime)
    reference = session.reference_unit(args.threads)
    parsed = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shape]
    result = session.measure(args.adapter, parsed, args.warmup, args.runs, reference)
    session.close()
    return {"load_ms": load_ms, **result, "peak_rss_mb": peak_rss_mb(),
            "fingerprint": fingerprint(spec.name, spec.distribution, args.threads)}


def reset_peak_rss() -> bool:
    """Start ``VmHWM`` again from the current RSS (Linux ≥ 4.0: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def serve() -> int:
    """``--serve``: one measurement per stdin line (a JSON list of the arguments above), one
    JSON line back (``{"result": …}`` or ``{"error": …}``). A process that measures many
    artifacts in turn (``loradeploy fleet``) saves starting Python and the runtime each time;
    the peak-RSS mark is reset before each, so ``peak_rss_mb`` is each artifact's own peak
    over what the process holds between artifacts (the runtime's libraries)."""
    import sys

    for line in sys.stdin:
        try:
            argv = json.loads(line)
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS mark (/proc/self/clear_refs)")
            reply = {"result": measure([str(a) for a in argv])}
        except SystemExit as e:  # argparse
            reply = {"error": f"bad arguments ({e})"}
        except Exception as e:  # the measurement's failure is the caller's to report  # noqa: BLE001
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve()
    print(json.dumps(measure(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
