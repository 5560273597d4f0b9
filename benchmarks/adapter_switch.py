"""Adapter switch time vs reloading the base, per runtime, as ratios measured in one run:

    python benchmarks/adapter_switch.py [--runtimes onnxruntime,llama.cpp,bitsandbytes]
                                        [--onnx ART] [--gguf ART] [--bnb ART] [--json]

* onnxruntime: a new ``InferenceSession`` on the artifact's graph vs activating an adapter
  (a ``RunOptions`` with ``add_active_adapter``, what every ``Session.run`` does);
* llama.cpp: loading the model again (``llama_model_load_from_file`` + a context) vs
  ``llama_set_adapters_lora`` between two adapters on one context; also the extra time the
  first decode after a switch takes (llama.cpp re-plans its graph);
* bitsandbytes: ``from_pretrained`` of the quantized base vs PEFT ``set_adapter``.

Also the time to load one adapter, raw and through ``loradeploy.runtime`` (provenance and
tensor checks included). Reloads are timed with the files in the page cache (the cheapest
reload, so the ratios are lower bounds). Artifacts not given are exported first from the
shipped example adapters (Gemma: a few minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTERS = REPO / "examples" / "adapters"
GOALS = {"onnxruntime": 1000, "llama.cpp": 100, "bitsandbytes": None}  # reload / switch, from issue 7


def _median_ms(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _per_call_ms(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of ``calls`` back-to-back calls (µs-scale ops)."""
    return statistics.median(_median_ms(lambda: [fn() for _ in range(calls)], 1) / calls for _ in range(rounds))


def _export(base: str, adapters: dict[str, Path], profile: str, out: Path) -> Path:
    import yaml

    from loradeploy.export import ExportConfig, export
    from loradeploy.job import AdapterInputs
    from loradeploy.profile import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{profile}.yaml").read_text())
    data.update({"warmup": 0, "runs": 1, "shapes": [{"batch": 1, "seq": 16}]})
    data.get("budgets", {}).pop("latency_p95_ms", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{profile}.yaml").write_text(yaml.safe_dump(data))
    export(ExportConfig(base, AdapterInputs.of(adapters), str(out.parent / f"{profile}.yaml"), out, mode="swappable"))
    return out


def _checked_load_ms(art: Path, file: str, n: int) -> float:
    from loradeploy import runtime

    session = runtime.open(art, adapters=False)
    counter = iter(range(10 ** 6))

    def load():
        name = f"x{next(counter)}"
        session.load_adapter(name, art / "adapters" / file)
        session.unload_adapter(name)
    ms = _median_ms(load, n)
    session.close()
    return ms


def bench_onnx(art: Path, runs: int) -> dict:
    import onnxruntime as ort

    from loradeploy.plugins.onnxruntime.session import session_options

    ort.set_default_logger_severity(3)
    model = str(art / "model.onnx")
    session = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    reload_ms = _median_ms(lambda: ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"]),
                           runs)
    path = str(art / "adapters" / "sora.onnx_adapter")
    lora = ort.LoraAdapter()
    lora.Load(path)

    def activate():
        ro = ort.RunOptions()
        ro.add_active_adapter(lora)
    del session
    return {"reload_ms": reload_ms, "reload_what": "new InferenceSession",
            "switch_ms": _per_call_ms(activate, 10_000), "switch_what": "RunOptions + add_active_adapter",
            "adapter_load_ms": _median_ms(lambda: ort.LoraAdapter().Load(path), 50),
            "adapter_load_checked_ms": _checked_load_ms(art, "sora.onnx_adapter", 20)}


def bench_llama(art: Path, runs: int) -> dict:
    import llama_cpp
    from llama_cpp import _internals

    from loradeploy import runtime

    session = runtime.open(art, workers=1)  # quiets llama.cpp's log; one model, one context
    worker, model = session._pool[0], session.model
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 256

    def reload():
        m = _internals.LlamaModel(path_model=str(art / "model.gguf"), params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
        c = _internals.LlamaContext(model=m, params=params, verbose=False)
        c.close()
        m.close()
    reload_ms = _median_ms(reload, runs)
    a, b = (session._adapters[n].handle for n in ("sora", "increlora"))
    pair = [((llama_cpp.llama_adapter_lora_p_ctypes * 1)(h), (ctypes.c_float * 1)(1.0)) for h in (a, b)]
    flip = iter(range(10 ** 9))

    def switch():
        arr, scale = pair[next(flip) % 2]
        llama_cpp.llama_set_adapters_lora(worker.ctx.ctx, arr, 1, scale)
    switch_ms = _per_call_ms(switch, 2_000)
    tokens = session.encode(["The soup was not good, but the staff"])["input_ids"][0].tolist()
    extra = []  # paired, interleaved: a decode after a switch minus a decode without one
    for _ in range(20):
        same = _median_ms(lambda: worker.last_logits(tokens, session.n_vocab), 1)
        extra.append(_median_ms(lambda: (switch(), worker.last_logits(tokens, session.n_vocab)), 1) - same)
    worker.set_adapter(None)  # switched behind the session's back: leave it clean
    path = str(art / "adapters" / "sora.gguf").encode()
    load_ms = _median_ms(lambda: llama_cpp.llama_adapter_lora_free(llama_cpp.llama_adapter_lora_init(model.model, path)), 10)
    result = {"reload_ms": reload_ms, "reload_what": "model load + context", "switch_ms": switch_ms,
              "switch_what": "llama_set_adapters_lora", "first_decode_extra_ms": statistics.median(extra),
              "decode_ms": _median_ms(lambda: worker.last_logits(tokens, session.n_vocab), 10), "decode_tokens": len(tokens),
              "adapter_load_ms": load_ms, "adapter_load_checked_ms": _checked_load_ms(art, "sora.gguf", 10)}
    session.close()
    return result


def bench_bnb(art: Path, runs: int) -> dict:
    import transformers

    from loradeploy import runtime

    session = runtime.open(art)
    model = session.runner.model
    reload_ms = _median_ms(lambda: transformers.AutoModelForSequenceClassification.from_pretrained(str(art)), runs)
    handles = list(session.runner.adapters)
    flip = iter(range(10 ** 9))
    switch_ms = _per_call_ms(lambda: model.set_adapter(handles[next(flip) % 2]), 200)
    result = {"reload_ms": reload_ms, "reload_what": "from_pretrained (nf4)", "switch_ms": switch_ms,
              "switch_what": "PEFT set_adapter", "adapter_load_checked_ms": _checked_load_ms(art, "sora", 3)}
    session.close()
    return result


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def _table(results: dict) -> str:
    head = f"{'runtime':<13} {'reload base':>12} {'adapter switch':>15} {'reload/switch':>14} {'goal':>7} " \
           f"{'adapter load':>13} {'checked load':>13}"
    lines = [head, "-" * len(head)]
    for rt, r in results.items():
        goal = GOALS[rt]
        ratio = r["reload_ms"] / r["switch_ms"]
        lines.append(f"{rt:<13} {r['reload_ms']:>9.1f} ms {r['switch_ms'] * 1e3:>12.2f} µs {ratio:>13,.0f}x "
                     f"{(f'{goal}x ' + ('ok' if ratio >= goal else 'NO')) if goal else '-':>7} "
                     f"{_ms(r.get('adapter_load_ms')):>13} {_ms(r['adapter_load_checked_ms']):>13}")
    for rt, r in results.items():
        lines.append(f"{rt}: reload = {r['reload_what']}; switch = {r['switch_what']}"
                     + (f"; first decode after a switch {r['first_decode_extra_ms']:+.2f} ms (a {r['decode_tokens']}-token "
                        f"decode: {r['decode_ms']:.1f} ms)" if "first_decode_extra_ms" in r else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtimes", default="onnxruntime,llama.cpp,bitsandbytes")
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--bnb", type=Path)
    ap.add_argument("--runs", type=int, default=5, help="reloads timed per runtime")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-switch-"))
    minilm = {n: ADAPTERS / n for n in ("sora", "increlora")}
    plan = {"onnxruntime": (args.onnx, bench_onnx, ("minilm", minilm, "onnx-cpu")),
            "llama.cpp": (args.gguf, bench_llama, ("gemma3-270m", {n: ADAPTERS / f"{n}-gemma" for n in minilm}, "gguf-cpu")),
            "bitsandbytes": (args.bnb, bench_bnb, ("minilm", minilm, "bnb-nf4"))}
    results = {}
    for rt in args.runtimes.split(","):
        art, bench, (base, adapters, profile) = plan[rt]
        art = art or _export(base, adapters, profile, work / profile / "art")
        results[rt] = {"artifact": str(art), **bench(art, args.runs)}
        results[rt]["reload_over_switch"] = results[rt]["reload_ms"] / results[rt]["switch_ms"]
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
