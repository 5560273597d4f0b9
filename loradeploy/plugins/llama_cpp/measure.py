"""Latency of a llama.cpp artifact (run by the latency worker through ``LlamaSession.measure``):
prompt processing and generation speed with the adapter and with the base alone, interleaved with
the runtime's reference unit, and adapter load/switch time against reloading the model."""

from __future__ import annotations

import ctypes


def measure_llama(session, adapter, shapes, warmup, runs, reference) -> dict:
    """The decoder latency protocol of :func:`loradeploy.timing.time_decoder` (prompt processing
    per length and generation, with ``adapter`` and with the base alone, interleaved with the
    runtime's reference unit), then adapter load/switch time vs a model reload."""
    from ...timing import time_decoder

    rec = session._rec(adapter)
    worker = session._acquire(rec)
    try:
        def use(with_adapter: bool) -> None:
            r = rec if with_adapter else None
            if worker.active is not r:
                worker.set_adapter(r)

        def prompt(with_adapter: bool, seq: int):
            tokens = [2] + [1000 + i for i in range(seq - 1)]

            def run():
                use(with_adapter)
                worker.last_logits(tokens, session.n_vocab)
            return run

        def generation(with_adapter: bool, n: int):
            start = [2, 1000, 1001, 1002]

            def run():
                use(with_adapter)
                worker.last_logits(start, session.n_vocab)
                for i in range(n):
                    worker.decode([1000 + i], n_past=len(start) + i)
            return run

        out = time_decoder(prompt, generation, [seq for _, seq in shapes], warmup, runs, reference)
        if rec is not None:
            out["generation"].update(_switch_vs_reload(session, worker, rec))
    finally:
        session._release(worker)
    return out


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
