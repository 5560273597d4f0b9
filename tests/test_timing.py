"""The runtime-independent timing protocols of loradeploy.timing, driven by plain callables that
record what ran (the real runtimes run them in the LM exporter and llama.cpp tests)."""

from __future__ import annotations

import time

import pytest

from loradeploy.timing import ScaledReference, time_calls, time_decoder


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_time_decoder_interleaves_adapter_base_and_reference_per_length():
    calls: list[tuple] = []

    def prompt(with_adapter, seq):
        return lambda: (calls.append(("pp", with_adapter, seq)), _busy(2.0 if with_adapter else 1.0))

    def generation(with_adapter, n):
        return lambda: (calls.append(("tg", with_adapter, n)), _busy(0.02 * n))

    out = time_decoder(prompt, generation, [64, 16, 64], warmup=1, runs=5, unit=lambda: _busy(0.05) or 0.05,
                       n_gen=8)
    assert sorted(out["shapes"]) == ["pp16", "pp64", "tg"]  # one prompt per length, sorted
    pp = [c for c in calls if c[0] == "pp"]
    # per length: the warm-up and one timed call, then adapter/base alternating
    assert pp[:12] == [("pp", True, 16), ("pp", True, 16)] + [("pp", True, 16), ("pp", False, 16)] * 5
    assert pp[12:] == [("pp", True, 64), ("pp", True, 64)] + [("pp", True, 64), ("pp", False, 64)] * 5
    tg = [c for c in calls if c[0] == "tg"]
    assert tg[0] == ("tg", True, 4) and tg[1:] == [("tg", True, 8), ("tg", False, 8)] * 2
    assert len(out["shapes"]["pp16"]["samples_ms"]) == 5 and len(out["shapes"]["tg"]["samples_ms"]) == 2
    gen = out["generation"]
    # the base alone runs half as long as the adapter here: its tokens/s is about twice as high
    assert 1.2 < gen["pp64_tokens_per_s_base"] / gen["pp64_tokens_per_s"] < 4.0
    assert gen["tg_tokens_per_s"] == pytest.approx(8 / (out["shapes"]["tg"]["p50_ms"] * 8 / 1e3), rel=1e-9)


def test_scaled_reference_runs_the_unit_until_the_call_length():
    ref = ScaledReference(lambda: _busy(0.5) or 0.5, call_ms=2.2)
    assert ref() == pytest.approx(0.5) and ref.repeats == 5


def test_time_calls_counts_warmup_apart():
    seen = []
    samples = time_calls(lambda: seen.append(1), warmup=2, runs=3)
    assert len(seen) == 5 and len(samples) == 3 and all(s >= 0 for s in samples)
