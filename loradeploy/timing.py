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


def time_decoder(prompt, generation, seqs, warmup: int, runs: int, unit, n_gen: int = 32) -> dict:
    """A causal LM's latency protocol, the same for every runtime: ``pp{seq}`` is one prompt of
    ``seq`` tokens with the adapter, interleaved with the reference unit and with the same prompt
    on the base alone; ``tg`` is per generated token (``n_gen`` after a short prompt). The runtime
    gives the calls: ``prompt(with_adapter, seq)`` and ``generation(with_adapter, n)`` return a
    function that runs once. Returns ``{"shapes": …, "generation": tokens/s with and without}``."""
    shapes, gen = {}, {}
    for seq in sorted(set(seqs)):  # one prompt per length (encoder profiles list batch shapes)
        with_adapter_run, base_run = prompt(True, seq), prompt(False, seq)
        ref = ScaledReference(unit, min(time_calls(with_adapter_run, warmup, 1)))
        with_adapter, base, refs = [], [], []
        for _ in range(max(runs, 1)):
            refs.append(ref())
            with_adapter += time_calls(with_adapter_run, 0, 1)
            base += time_calls(base_run, 0, 1)
        shapes[f"pp{seq}"] = {**stats(with_adapter), **ratio_stats(with_adapter, refs, ref.repeats)}
        gen[f"pp{seq}_tokens_per_s"] = seq / (float(np.median(with_adapter)) / 1e3)
        gen[f"pp{seq}_tokens_per_s_base"] = seq / (float(np.median(base)) / 1e3)
    with_adapter_run, base_run = generation(True, n_gen), generation(False, n_gen)
    time_calls(generation(True, 4), 1, 0)  # first generation pays one-time allocations
    gen_a, gen_b, gen_refs, ref = [], [], [], None
    for _ in range(max(runs // 4, 2)):
        gen_a += time_calls(with_adapter_run, 0, 1)
        ref = ref or ScaledReference(unit, gen_a[0])  # as long as a whole generation
        gen_refs.append(ref())
        gen_b += time_calls(base_run, 0, 1)
    per_token = [g / n_gen for g in gen_a]
    shapes["tg"] = {**stats(per_token), **ratio_stats(per_token, gen_refs, ref.repeats)}
    gen["tg_tokens_per_s"] = n_gen / (float(np.median(gen_a)) / 1e3)
    gen["tg_tokens_per_s_base"] = n_gen / (float(np.median(gen_b)) / 1e3)
    return {"shapes": shapes, "generation": gen}
