"""Timing primitives every session uses (a leaf: numpy only): timed calls, their p50/p95, and
their ratio to the runtime's fixed reference unit, interleaved call by call. The process that
opens an artifact and prints the record is :mod:`loradeploy.runtime.latency_worker`."""

from __future__ import annotations

import time

import numpy as np


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
