"""Latency of a causal-LM ONNX artifact (run by the latency worker through ``OrtSession.measure``):
prompt processing and generation speed with the adapter and with the base alone, interleaved with
the runtime's reference unit, and what switching adapters costs next to reloading the session."""

from __future__ import annotations

import time

import numpy as np


def measure_decoder(session, rec, shapes, warmup: int, runs: int, reference) -> dict:
    """``pp{seq}``: one prompt of ``seq`` tokens; ``tg``: per generated token (32 after a 4-token
    prompt). ``generation`` holds tokens/s with and without the adapter and the switch costs."""
    from ..timing import ScaledReference, ratio_stats, stats
    from ..timing import time_calls as _time

    decoder = session._lm()
    with_options, base_options = session._options(rec), session._options(None)

    def prompt(options, tokens):
        return lambda: decoder.forward(tokens, None, options)

    def token(i: int) -> int:  # arbitrary ordinary tokens, within any vocabulary
        return 3 + (1000 + i) % (decoder.vocab - 3)

    def generate(options, start, n):
        def run():
            logits, past = decoder.forward(start, None, options)
            for i in range(n):
                logits, past = decoder.forward([token(i)], past, options)
        return run

    result, gen = {}, {}
    for seq in sorted({seq for _, seq in shapes}):  # one prompt per length (batch shapes of encoder profiles)
        tokens = [2] + [token(i) for i in range(seq - 1)]
        warm = _time(prompt(with_options, tokens), warmup, 1)
        ref = ScaledReference(reference, min(warm))
        with_adapter, base, refs = [], [], []
        for _ in range(max(runs, 1)):
            refs.append(ref())
            with_adapter += _time(prompt(with_options, tokens), 0, 1)
            base += _time(prompt(base_options, tokens), 0, 1)
        result[f"pp{seq}"] = {**stats(with_adapter), **ratio_stats(with_adapter, refs, ref.repeats)}
        gen[f"pp{seq}_tokens_per_s"] = seq / (float(np.median(with_adapter)) / 1e3)
        gen[f"pp{seq}_tokens_per_s_base"] = seq / (float(np.median(base)) / 1e3)
    n_gen, start = 32, [2, token(0), token(1), token(2)]
    gen_a, gen_b, gen_refs, ref = [], [], [], None
    _time(generate(with_options, start, 4), 1, 0)
    for _ in range(max(runs // 4, 2)):
        gen_a += _time(generate(with_options, start, n_gen), 0, 1)
        ref = ref or ScaledReference(reference, gen_a[0])
        gen_refs.append(ref())
        gen_b += _time(generate(base_options, start, n_gen), 0, 1)
    per_token = [g / n_gen for g in gen_a]
    result["tg"] = {**stats(per_token), **ratio_stats(per_token, gen_refs, ref.repeats)}
    gen["tg_tokens_per_s"] = n_gen / (float(np.median(gen_a)) / 1e3)
    gen["tg_tokens_per_s_base"] = n_gen / (float(np.median(gen_b)) / 1e3)
    if rec is not None:
        gen.update(_switch_vs_reload(session, rec))
    return {"shapes": result, "generation": gen}


def _switch_vs_reload(session, rec) -> dict:
    """Loading the adapter file, switching (a run's options naming another adapter) and reloading
    the whole session, in ms."""
    from .onnx import MODEL_FILE, inference_session

    ort = session._ort
    out = {}
    t0 = time.perf_counter()
    ort.LoraAdapter().Load(str(rec.info.path))
    out["adapter_load_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    for _ in range(100):
        session._options(rec)
        session._options(None)
    out["adapter_switch_ms"] = (time.perf_counter() - t0) * 1e3 / 200
    t0 = time.perf_counter()
    inference_session(session.artifact / MODEL_FILE)
    out["model_reload_ms"] = (time.perf_counter() - t0) * 1e3
    out["reload_over_switch"] = out["model_reload_ms"] / out["adapter_switch_ms"]
    return out
