"""onnx-web-int4, a causal LM in the page: greedy generation speed in wasm against onnxruntime CPU.

    python benchmarks/onnx_web_lm.py --bundle DIR [--adapter sora] [--rounds 5] [--tokens 32] [--json]

DIR is an ``export --target onnx-web-int4`` bundle (e.g. gemma3-270m with sora-gemma). In interleaved
rounds, 1 thread each, the same prompt (the bundle's first example) and the same adapter tensors:
  - the bundle's loradeploy.mjs (lm.mjs) in onnxruntime-web's wasm backend under Node, timed inside Node;
  - onnxruntime CPU on the bundle's own model.onnx (MatMulNBits accuracy_level 0: what wasm computes);
  - onnxruntime CPU on that graph with accuracy_level 4 (what onnx-cpu-int4 ships: int8 activations
    in MLAS's int4 kernels).
Each: the prompt's time (prefill) and tokens/s over the ``--tokens`` greedy steps after it (KV cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def ort_cpu_greedy(bundle: Path, model: Path, adapter: str | None):
    """A callable: (tokens, n) → (prompt ms, generation ms, tokens) in onnxruntime CPU, 1 thread."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    config = json.loads((bundle / "web.json").read_text())
    dec = config["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feeds = {n: np.zeros([s["shape"][0], 0] if s["role"] == "lora_A" else [0, s["shape"][1]], np.float32)
             for n, s in config["slots"].items()}
    feeds.update(load_file(str(bundle / config["base_tensors"])))
    if adapter:
        feeds.update(load_file(str(bundle / config["adapters"][adapter])))
    empty = np.zeros((1, dec["kv_heads"], 0, dec["head_size"]), np.float32)

    def forward(tokens, past):
        run = {**feeds, **dict(zip(dec["past"], past))}
        run["input_ids"] = np.asarray([tokens], np.int64)
        run["attention_mask"] = np.ones((1, past[0].shape[2] + len(tokens)), np.int64)
        out = session.run([dec["logits"], *dec["present"]], run)
        return out[0][0], out[1:]

    def greedy(tokens, n):
        t0 = time.perf_counter()
        logits, past = forward(tokens, [empty] * len(dec["past"]))
        t1 = time.perf_counter()
        out = []
        while len(out) < n:
            out.append(int(np.argmax(logits[-1])))
            if len(out) < n:
                logits, past = forward(out[-1:], past)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, out
    return greedy


def with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = level
    onnx.save(model, str(dst))
    return dst


def measure(bundle: Path, adapter: str | None, rounds: int, n: int) -> dict:
    from loradeploy.plugins.onnx_web.node import NodeWorker

    config = json.loads((bundle / "web.json").read_text())
    worker = NodeWorker()
    worker.call("open", bundle=str(bundle.absolute()), threads=1)
    if adapter:
        worker.call("load", name=adapter, path=str((bundle / config["adapters"][adapter]).absolute()))
    tokens = worker.call("tokenize", text=config["examples"][0])
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"wasm": lambda: (lambda r: (r["promptMs"], r["generateMs"], r["tokens"]))(
                       worker.call("time_greedy", tokens=tokens, adapter=adapter, n=n + 1)),
                   "ort_cpu_level0": (lambda g: lambda: g(tokens, n + 1))(
                       ort_cpu_greedy(bundle, bundle / "model.onnx", adapter)),
                   "ort_cpu_level4": (lambda g: lambda: g(tokens, n + 1))(
                       ort_cpu_greedy(bundle, with_accuracy_level(bundle / "model.onnx", Path(tmp) / "l4.onnx", 4),
                                      adapter))}
        samples = {k: [] for k in runners}
        outputs = {k: run()[2] for k, run in runners.items()}  # warm-up, and the tokens each chose
        for _ in range(rounds):
            for name, run in runners.items():
                samples[name].append(run()[:2])
    worker.close()
    out = {"prompt_tokens": len(tokens), "new_tokens": n, "rounds": rounds, "adapter": adapter}
    for name, rows in samples.items():
        prompt_ms = statistics.median(r[0] for r in rows)
        gen_ms = statistics.median(r[1] for r in rows)
        out[name] = {"prompt_ms": prompt_ms, "tokens_per_s": n / (gen_ms / 1e3)}
    out["wasm_over_ort_cpu_level4_tokens_per_s"] = out["wasm"]["tokens_per_s"] / out["ort_cpu_level4"]["tokens_per_s"]
    out["wasm_over_ort_cpu_level0_tokens_per_s"] = out["wasm"]["tokens_per_s"] / out["ort_cpu_level0"]["tokens_per_s"]
    out["same_tokens_as_wasm"] = {k: outputs[k] == outputs["wasm"] for k in outputs if k != "wasm"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an onnx-web-int4 bundle")
    ap.add_argument("--adapter", default=None, help="an adapter of the bundle (default: its first)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    config = json.loads((args.bundle / "web.json").read_text())
    adapter = args.adapter or next(iter(config["adapters"]), None)
    result = measure(args.bundle, adapter, args.rounds, args.tokens)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name in ("wasm", "ort_cpu_level0", "ort_cpu_level4"):
            r = result[name]
            print(f"{name:16s} prompt {r['prompt_ms']:8.1f} ms ({result['prompt_tokens']} tokens)   "
                  f"{r['tokens_per_s']:7.2f} tokens/s")
        ratio = result["wasm_over_ort_cpu_level4_tokens_per_s"]
        print(f"wasm / onnxruntime CPU int4 (accuracy_level 4) tokens/s: {ratio:.4f}; "
              f"same greedy tokens as wasm: {result['same_tokens_as_wasm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
