"""Latency of a llama.cpp artifact (run by the latency worker through ``LlamaSession.measure``):
prompt processing and generation speed with the adapter and with the base alone, interleaved with
the runtime's reference unit, and adapter load/switch time against reloading the model."""

from __future__ import annotations

import ctypes

import numpy as np


def measure_llama(session, adapter, shapes, warmup, runs, reference) -> dict:
    """Prompt processing per shape (one sequence of ``seq`` tokens) and generation speed, with
    ``adapter`` and with the base alone, interleaved with ``reference`` (the runtime's fixed
    unit, scaled to the call's length); adapter load/switch time vs a model reload."""
    from ...timing import ScaledReference, ratio_stats, stats
    from ...timing import time_calls as _time

    rec = session._rec(adapter)
    worker = session._acquire(rec)
    try:
        def prompt(r, tokens):
            def run():
                if worker.active is not r:
                    worker.set_adapter(r)
                worker.last_logits(tokens, session.n_vocab)
            return run

        def generate(r, prompt_tokens, n):
            def run():
                if worker.active is not r:
                    worker.set_adapter(r)
                worker.last_logits(prompt_tokens, session.n_vocab)
                for i in range(n):
                    worker.decode([1000 + i], n_past=len(prompt_tokens) + i)
            return run

        result, llama = {}, {}
        for _, seq in shapes:
            tokens = [2] + [1000 + i for i in range(seq - 1)]
            warm = _time(prompt(rec, tokens), warmup, 1)
            ref = ScaledReference(reference, min(warm))
            with_adapter, base, refs = [], [], []
            for _ in range(max(runs, 1)):
                refs.append(ref())
                with_adapter += _time(prompt(rec, tokens), 0, 1)
                base += _time(prompt(None, tokens), 0, 1)
            result[f"pp{seq}"] = {**stats(with_adapter), **ratio_stats(with_adapter, refs, ref.repeats)}
            llama[f"pp{seq}_tokens_per_s"] = seq / (float(np.median(with_adapter)) / 1e3)
            llama[f"pp{seq}_tokens_per_s_base"] = seq / (float(np.median(base)) / 1e3)
        n_gen, start = 32, [2, 1000, 1001, 1002]
        gen_a, gen_b, gen_refs, ref = [], [], [], None
        for _ in range(max(runs // 4, 2)):
            gen_a += _time(generate(rec, start, n_gen), 0, 1)
            ref = ref or ScaledReference(reference, gen_a[0])  # as long as a whole generation
            gen_refs.append(ref())
            gen_b += _time(generate(None, start, n_gen), 0, 1)
        per_token = [g / n_gen for g in gen_a]
        result["tg"] = {**stats(per_token), **ratio_stats(per_token, gen_refs, ref.repeats)}
        llama["tg_tokens_per_s"] = n_gen / (float(np.median(gen_a)) / 1e3)
        llama["tg_tokens_per_s_base"] = n_gen / (float(np.median(gen_b)) / 1e3)
        if rec is not None:
            llama.update(_switch_vs_reload(session, worker, rec))
    finally:
        session._release(worker)
    return {"shapes": result, "generation": llama}


def _switch_vs_reload(session, worker, rec) -> dict:
    import time

    from llama_cpp import _internals

    out = {}
    t0 = time.perf_counter()
    with session._model_lock.exclusive():
        extra = session._ll.llama_adapter_lora_init(session.model.model, str(rec.info.path).encode())
    out["adapter_load_ms"] = (time.perf_counter() - t0) * 1e3
    with session._model_lock.exclusive():
        session._ll.llama_adapter_lora_free(extra)
    arr = (session._ll.llama_adapter_lora_p_ctypes * 1)(rec.handle)
    scale = (ctypes.c_float * 1)(1.0)
    t0 = time.perf_counter()
    for _ in range(100):
        session._ll.llama_set_adapters_lora(worker.ctx.ctx, arr, 1, scale)
        session._ll.llama_set_adapters_lora(worker.ctx.ctx, None, 0, None)
    out["adapter_switch_ms"] = (time.perf_counter() - t0) * 1e3 / 200
    worker.active = None
    t0 = time.perf_counter()
    model = _internals.LlamaModel(path_model=str(session._path), params=session._ll.llama_model_default_params(),
                                  verbose=False)
    ctx = _internals.LlamaContext(model=model, params=session._params, verbose=False)
    out["model_reload_ms"] = (time.perf_counter() - t0) * 1e3
    ctx.close()
    model.close()
    out["reload_over_switch"] = out["model_reload_ms"] / out["adapter_switch_ms"]
    return out
