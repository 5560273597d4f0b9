"""onnx-web target, ratios measured side by side in one run (MiniLM classifier, sora and increlora).

    python benchmarks/onnx_web.py [--bundle DIR] [--int8 | --int8-bundle DIR ...] [--rounds 20] [--json]

On one web bundle (exported here unless ``--bundle`` names one), at batch 1 × seq 128, 1 thread:
  - the bundle's loradeploy.mjs in onnxruntime-web's wasm backend under Node (timed inside Node),
    adapter on, against onnxruntime CPU (1 thread, spinning off) on the same model.onnx fed the
    same tensors — rounds interleaved, so both see the same load;
  - the same bundle's graph with the adapter on against the adapter merged into the weights (the
    graph traced the same way, no slots), both in wasm;
  - loading an adapter into the open session (loadAdapter: read, check, keep its tensors) against
    re-creating the session (open: the graph, the tokenizer, the base's tensors);
  - fidelity from the export's own validation (max |Δlogit| vs PyTorch) and its browser check;
  - the kernel floor: one MatMul of MiniLM's shape (128×384 by 384×1536, fp32, the FFN's first
    product) in wasm against onnxruntime CPU, interleaved — what the whole-graph ratio is made of;
  - with ``--int8`` (exported here, same adapters and eval texts) or ``--int8-bundle`` (one or more,
    e.g. two quantizations side by side): each int8 bundle's bytes against the fp32 bundle's, its
    fidelity from its validation, its base's word embedding, and its wasm time with the adapter on,
    timed in its own Node worker in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTERS = ("sora", "increlora")
SEQ = 128


def export_bundle(out: Path, eval_texts: int, target: str = "onnx-web") -> Path:
    from loradeploy.evaldata import DEFAULT_EVAL
    from loradeploy.job import AdapterSpec
    from tests.support.exports import export_adapters
    from tests.support.profiles import quick_profile

    ev = out / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:eval_texts]) + "\n")
    profile = quick_profile(out, target, warmup=1, runs=3, shapes=[{"batch": 1, "seq": SEQ}])
    specs = [AdapterSpec(n, REPO / "examples" / "adapters" / n) for n in ADAPTERS]
    export_adapters("minilm", specs, profile, out / target, eval_path=ev)
    return out / target


def ort_cpu_runner(bundle: Path, adapter: str, ids: np.ndarray):
    """A callable timing one onnxruntime CPU call (ms) of model.onnx with ``adapter``'s tensors."""
    import time

    import onnxruntime as ort
    from safetensors.numpy import load_file

    config = json.loads((bundle / "web.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for name, slot in config["slots"].items():
        shape = (slot["shape"][0], 0) if slot["role"] == "lora_A" else (0, slot["shape"][1])
        feeds[name] = np.zeros(shape, np.float32)
    feeds.update(load_file(str(bundle / "base.safetensors")))
    feeds.update(load_file(str(bundle / "adapters" / f"{adapter}.safetensors")))
    feeds.update(input_ids=ids, attention_mask=np.ones_like(ids))

    def call() -> float:
        t0 = time.perf_counter()
        session.run(None, feeds)
        return (time.perf_counter() - t0) * 1e3
    return call, lambda: session.run(None, feeds)[0]


def merged_graph(adapter: str, path: Path) -> Path:
    """MiniLM with ``adapter`` merged into its weights, traced as the bundle's graph is (no slots)."""
    import copy

    from loradeploy.adapters import read_adapter
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.merge import merge_into
    from loradeploy.prune import prune
    from loradeploy.traced_graph import GraphModule, eager_attention, export_graph

    adapters, _ = prune(read_adapter(REPO / "examples" / "adapters" / adapter))
    model = load_torch_model(resolve_base("minilm"), adapters.task, adapters.num_labels)
    merged = merge_into(eager_attention(copy.deepcopy(model)), adapters)
    export_graph(GraphModule(merged, adapters.task, [], []), {}, {}, path, 17)
    return path


def kernel_graph(path: Path) -> Path:
    """One fp32 MatMul of MiniLM's FFN shape behind a Gather of the token ids (so the Node
    worker's ids-only timing call feeds it): [1, 128, 384] by [384, 1536]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((2000, 384)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((384, 1536)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "kernel", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ]),
                   helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, 1536])], [table, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def kernel_cpu_runner(path: Path, ids: np.ndarray):
    import time

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def call() -> float:
        t0 = time.perf_counter()
        session.run(None, feeds)
        return (time.perf_counter() - t0) * 1e3
    return call


def open_worker(bundle: Path, adapters=ADAPTERS):
    """A Node worker with ``bundle`` open (1 thread) and ``adapters`` loaded."""
    from loradeploy.plugins.onnx_web.node import NodeWorker

    worker = NodeWorker()
    worker.call("open", bundle=str(bundle), threads=1)
    for name in adapters:
        worker.call("load", name=name, path=str(bundle / "adapters" / f"{name}.safetensors"))
    return worker


def int8_record(bundle: Path, fp32_bytes: int, ms: list[float], fp32_ms: list[float]) -> dict:
    """An int8 bundle beside the fp32 one: bytes, fidelity (its validation), embedding, wasm time."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    v = manifest["validation"]
    return {"bytes": v["artifact_bytes"], "over_fp32_bytes": v["artifact_bytes"] / fp32_bytes,
            "token_embedding": manifest["decisions"].get("token_embedding"), "eval_inputs": v["eval_inputs"],
            "fidelity": {a: {k: v["metrics"][a][k] for k in ("label_agreement", "max_abs_logit", "adapter_effect_kept")}
                         for a in ADAPTERS},
            "browser_check": (v["metrics"].get("browser_check") or {}).get("status"),
            "wasm_p50_ms": statistics.median(ms), "wasm_min_ms": min(ms),
            "over_fp32_wasm_p50": statistics.median(ms) / statistics.median(fp32_ms)}


def measure(bundle: Path, rounds: int, per_round: int = 3, merged: Path | None = None,
            int8: tuple[Path, ...] = (), kernel: Path | None = None) -> dict:
    ids = np.random.default_rng(0).integers(1000, 2000, size=(1, SEQ), dtype=np.int64)
    worker = open_worker(bundle)
    int8_workers = []
    try:
        int8_workers = [open_worker(b, ADAPTERS[:1]) for b in int8]
        ort_call, ort_outputs = ort_cpu_runner(bundle, ADAPTERS[0], ids)
        args = dict(input_ids=ids.tolist(), attention_mask=np.ones_like(ids).tolist())
        # the two runtimes compute the same graph with the same tensors: the same outputs
        wasm_out = np.asarray(worker.call("run_ids", adapter=ADAPTERS[0], **args))
        same = float(np.abs(wasm_out - ort_outputs()).max())
        worker.call("time_runs", adapter=ADAPTERS[0], runs=3, **args)
        [ort_call() for _ in range(3)]
        for w in int8_workers:
            w.call("time_runs", adapter=ADAPTERS[0], runs=3, **args)
        wasm, cpu, merged_wasm, int8_wasm, kernel_wasm, kernel_cpu = [], [], [], [[] for _ in int8], [], []
        kernel_call = kernel_cpu_runner(kernel, ids) if kernel is not None else None
        for _ in range(rounds):
            wasm += worker.call("time_runs", adapter=ADAPTERS[0], runs=per_round, **args)
            for w, ms in zip(int8_workers, int8_wasm):
                ms += w.call("time_runs", adapter=ADAPTERS[0], runs=per_round, **args)
            cpu += [ort_call() for _ in range(per_round)]
            if merged is not None:
                timed = worker.call("time_model", model=str(merged), runs=per_round, **args)
                merged_wasm += timed["ms"]
                merged_vs_swappable = float(np.abs(np.asarray(timed["output"]) - wasm_out[0]).max())
            if kernel_call is not None:
                kernel_wasm += worker.call("time_model", model=str(kernel), runs=per_round, **args)["ms"]
                kernel_cpu += [kernel_call() for _ in range(per_round)]
        base_wasm = worker.call("time_runs", adapter=None, runs=per_round * 3, **args)
        loads, opens = [], []
        for i in range(max(3, rounds // 4)):
            loads.append(worker.call("time_load", name=f"again{i}", path=str(bundle / "adapters" / f"{ADAPTERS[1]}.safetensors")))
            opens.append(worker.call("time_open", bundle=str(bundle)))
        node_rss = worker.call("peak_rss_mb")
    finally:
        for w in (worker, *int8_workers):
            w.close()
    manifest = json.loads((bundle / "manifest.json").read_text())
    v = manifest["validation"]
    p50 = statistics.median
    return {
        "shape": f"b1xs{SEQ}", "threads": 1, "rounds": rounds, "calls_per_round": per_round,
        "wasm_p50_ms": p50(wasm), "wasm_min_ms": min(wasm), "ort_cpu_p50_ms": p50(cpu), "ort_cpu_min_ms": min(cpu),
        "wasm_over_ort_cpu_p50": p50(wasm) / p50(cpu), "wasm_over_ort_cpu_min": min(wasm) / min(cpu),
        "wasm_no_adapter_p50_ms": p50(base_wasm),
        **({"merged_wasm_p50_ms": p50(merged_wasm), "swappable_over_merged_wasm_p50": p50(wasm) / p50(merged_wasm),
            "swappable_over_merged_wasm_min": min(wasm) / min(merged_wasm),
            "merged_vs_swappable_max_abs": merged_vs_swappable} if merged_wasm else {}),
        **({"kernel_matmul_wasm_p50_ms": p50(kernel_wasm), "kernel_matmul_ort_cpu_p50_ms": p50(kernel_cpu),
            "kernel_matmul_wasm_over_ort_cpu_p50": p50(kernel_wasm) / p50(kernel_cpu)} if kernel_wasm else {}),
        "adapter_load_p50_ms": p50(loads), "session_open_p50_ms": p50(opens),
        "open_over_adapter_load": p50(opens) / p50(loads),
        "node_peak_rss_mb": node_rss,
        "fidelity": {a: {k: v["metrics"][a][k] for k in ("label_agreement", "max_abs_logit")} for a in ADAPTERS},
        "eval_inputs": v["eval_inputs"], "browser_check": v["metrics"].get("browser_check"),
        "wasm_vs_ort_cpu_max_abs": same,
        **({"int8": {b.name: int8_record(b, v["artifact_bytes"], ms, wasm) for b, ms in zip(int8, int8_wasm)}}
           if int8 else {}),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="an exported onnx-web bundle of MiniLM with sora and increlora")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--eval-texts", type=int, default=500, help="eval texts the export validates on")
    ap.add_argument("--skip-merged", action="store_true", help="do not time the merged graph in wasm")
    ap.add_argument("--int8", action="store_true", help="also export the onnx-web-int8 bundle and set it beside")
    ap.add_argument("--int8-bundle", type=Path, nargs="+", default=[],
                    help="onnx-web-int8 bundles of the same adapters to set beside (named by their folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or export_bundle(Path(tmp), args.eval_texts)
        int8 = [*args.int8_bundle, *([export_bundle(Path(tmp), args.eval_texts, "onnx-web-int8")] if args.int8 else [])]
        merged = None if args.skip_merged else merged_graph(ADAPTERS[0], Path(tmp) / "merged.onnx")
        result = measure(bundle, args.rounds, merged=merged, int8=tuple(int8),
                         kernel=kernel_graph(Path(tmp) / "kernel.onnx"))
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else value
        print(f"{key:28} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
