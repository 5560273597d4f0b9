"""ONNX Runtime target, ratios measured side by side in one run (MiniLM classifier, SoRA example).

    python benchmarks/onnx_cpu.py [--rounds 40] [--skip-optimum]
    python benchmarks/onnx_cpu.py --norms-cost [--rounds 40]

Runners, timed round by round (interleaved) at batch 1 × seq 128 with ORT spinning off:
  - PyTorch eager, base + the unmerged pruned PEFT adapter (the anchor)
  - loradeploy onnx-cpu merged fp32, onnx-cpu swappable (adapter active, and none active),
    onnx-cpu-int8 merged; merged and swappable again at batch 8 × seq 128
  - optimum ONNX export + ORT dynamic int8 (avx2 config) of the same merged model, made in a
    separate venv (.venv-optimum: optimum-onnx needs transformers < 4.58)
Also: adapter load/activation vs a new InferenceSession, and the wall time of `loradeploy export`.

``--norms-cost`` (issue 36) measures only what LayerNorm inputs cost: the swappable graph with the
default slots (``blocks,norms``: every LayerNorm's weight and bias an overridable input) against
``--slots blocks`` (norms constant), no adapter and adapter on, b1 and b8 × seq 128, interleaved,
and counts the fused ops in each graph as onnxruntime optimizes it at load time and offline.
"""

from __future__ import annotations

import os

# Neither runtime may spin idle threads between calls (ORT: allow_spinning=0 in its session
# options; PyTorch/OpenMP: passive wait), or each steals the cores of the one timed next.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTER = REPO / "examples" / "adapters" / "sora"
OPTIMUM_VENV = REPO / ".venv-optimum"
SEQ = 128


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed_export(target: str, mode: str, out: Path) -> float:
    t0 = time.perf_counter()
    sh([sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter", str(ADAPTER),
        "--target", target, "--mode", mode, "-o", str(out), "--overwrite"])
    return time.perf_counter() - t0


def optimum_int8(merged_hf: Path, work: Path) -> Path:
    """optimum's own export + dynamic int8 quantization, in its own venv."""
    py = OPTIMUM_VENV / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(OPTIMUM_VENV)])
        sh([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"])
        sh([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
            "optimum-onnx[onnxruntime]", "transformers<4.58"])
    onnx_dir, q_dir = work / "optimum-onnx", work / "optimum-int8"
    sh([str(OPTIMUM_VENV / "bin" / "optimum-cli"), "export", "onnx", "--model", str(merged_hf),
        "--task", "text-classification", str(onnx_dir)], env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    sh([str(OPTIMUM_VENV / "bin" / "optimum-cli"), "onnxruntime", "quantize", "--onnx_model", str(onnx_dir),
        "--avx2", "-o", str(q_dir)], env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return next(q_dir.glob("*.onnx"))


class OrtFile:
    """A plain ORT session on an .onnx file (for optimum's output)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        from loradeploy.plugins.onnxruntime.session import session_options

        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.session.get_inputs()}

    def run(self, ids, mask, adapter=None):
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(None, feeds)[0]


def interleaved(runners: dict, ids, mask, rounds: int) -> dict[str, float]:
    for fn in runners.values():  # warm-up
        for _ in range(3):
            fn(ids, mask)
    samples = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(ids, mask)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def fidelity(fn, ref: np.ndarray, tokenizer, texts) -> dict:
    from loradeploy.evaldata import length_order
    from loradeploy.reference import batches, in_text_order
    from loradeploy.validate import fidelity as fid
    from loradeploy.ir import Task

    order = length_order(tokenizer, texts)
    got = in_text_order([fn(i, m) for i, m in batches(tokenizer, texts, order)], order)
    f = fid(ref, got, None, Task.SEQUENCE_CLASSIFICATION)
    return {"label_agreement": f["label_agreement"], "max_abs_logit": f["max_abs_logit"],
            "mean_abs_logit": f["mean_abs_logit"]}


def fused_ops(path: Path, work: Path) -> dict[str, dict[str, int]]:
    """Op counts of interest in ``path`` as onnxruntime's session optimizes it at load time and
    as its offline transformer optimizer (`fuse_transformer`) rewrites it."""
    import collections
    import onnx
    import onnxruntime as ort

    from loradeploy.plugins.onnxruntime.exporter import _quiet_logs
    from loradeploy.plugins.onnxruntime.ort import session_options
    from onnxruntime.transformers.optimizer import optimize_model

    wanted = ("SkipLayerNormalization", "LayerNormalization", "EmbedLayerNormalization", "Attention", "BiasGelu")
    so = session_options()
    so.optimized_model_filepath = str(work / f"{path.parent.name}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    at_load = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    with _quiet_logs():
        offline = collections.Counter(n.op_type for n in optimize_model(
            str(path), model_type="bert", num_heads=12, hidden_size=384).model.graph.node)
    return {"at load": {k: at_load[k] for k in wanted}, "offline": {k: offline[k] for k in wanted}}


def norms_cost(rounds: int) -> int:
    """Latency of the default swappable graph (norms as inputs) relative to ``--slots blocks``."""
    from loradeploy import runtime
    from loradeploy.base import load_tokenizer, resolve_base
    from loradeploy.evaldata import load_eval
    from loradeploy.plugins.onnxruntime import MODEL_FILE

    work = Path(tempfile.mkdtemp(prefix="bench-norms-"))
    graphs = {"norms as inputs (blocks,norms)": work / "norms", "today (blocks)": work / "blocks"}
    for label, out in graphs.items():
        sh([sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter", str(ADAPTER),
            "--target", "onnx-cpu", "--mode", "swappable", "-o", str(out), "--overwrite"]
           + (["--slots", "blocks"] if "today" in label else []))
    art = {label: runtime.open(out) for label, out in graphs.items()}
    runners = {f"{label} {'adapter on' if a else 'no adapter'}":
               (lambda s, a: lambda i, m: s.run({"input_ids": i, "attention_mask": m}, a).outputs)(art[label], a)
               for a in ("sora", None) for label in graphs}
    tok = load_tokenizer(resolve_base("minilm"))
    enc = tok(load_eval().texts[:1], padding="max_length", max_length=SEQ, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    tables = {f"b1 s{SEQ}": interleaved(runners, ids, mask, rounds),
              f"b8 s{SEQ}": interleaved(runners, np.repeat(ids, 8, 0), np.repeat(mask, 8, 0), max(rounds // 4, 5))}
    print(f"\nMiniLM classifier + SoRA example, swappable onnx-cpu: norms as inputs vs today, "
          f"median of interleaved rounds ({rounds} at b1, {max(rounds // 4, 5)} at b8)")
    print(f"{'shape':10} {'adapter':11} {'norms ms':>9} {'today ms':>9} {'ratio':>7}")
    for shape, ms in tables.items():
        for a in ("no adapter", "adapter on"):
            new, old = ms[f"norms as inputs (blocks,norms) {a}"], ms[f"today (blocks) {a}"]
            print(f"{shape:10} {a:11} {new:9.2f} {old:9.2f} {new / old:7.3f}")
    for label, out in graphs.items():
        print(f"fused ops, {label}: {fused_ops(out / MODEL_FILE, work)}")
    (work / "results.json").write_text(json.dumps(tables, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--skip-optimum", action="store_true")
    ap.add_argument("--norms-cost", action="store_true", help="only the cost of LayerNorm inputs (issue 36)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.norms_cost:
        return norms_cost(args.rounds)
    import onnxruntime as ort
    from peft import PeftModel

    from loradeploy.adapters import peft as peft_format, read_adapter
    from loradeploy.base import load_tokenizer, load_torch_model, resolve_base
    from loradeploy.evaldata import load_eval
    from loradeploy.ir import Task
    from loradeploy import runtime
    from loradeploy.merge import merge_into
    from loradeploy.prune import prune
    from loradeploy.manifest import ADAPTER_DIR
    from loradeploy.plugins.onnxruntime import MODEL_FILE
    from loradeploy.plugins.onnxruntime.ort import session_options
    from loradeploy.reference import reference_outputs

    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    wall = {"export onnx-cpu swappable (demo)": timed_export("onnx-cpu", "swappable", work / "swap")}
    wall["export onnx-cpu merged"] = timed_export("onnx-cpu", "merged", work / "merged")
    wall["export onnx-cpu-int8 merged"] = timed_export("onnx-cpu-int8", "merged", work / "int8")

    base_dir = resolve_base("minilm")
    tok = load_tokenizer(base_dir)
    base = load_torch_model(base_dir, Task.SEQUENCE_CLASSIFICATION, 2)
    original = read_adapter(ADAPTER)
    pruned, _ = prune(original)
    peft_dir = work / "peft"
    peft_dir.mkdir()
    peft_format.write(pruned, peft_dir)
    eager = PeftModel.from_pretrained(copy.deepcopy(base), str(peft_dir)).eval()
    merged_hf = work / "merged-hf"
    merge_into(copy.deepcopy(base), original).save_pretrained(merged_hf)
    tok.save_pretrained(merged_hf)

    def torch_fn(ids, mask):
        with torch.no_grad():
            return eager(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()

    art = {k: runtime.open(work / k) for k in ("swap", "merged", "int8")}

    def run(name, adapter=None):
        return lambda i, m: art[name].run({"input_ids": i, "attention_mask": m}, adapter).outputs

    runners = {
        "pytorch eager + unmerged PEFT": torch_fn,
        "onnx-cpu merged fp32": run("merged"),
        "onnx-cpu swappable (adapter on)": run("swap", "sora"),
        "onnx-cpu swappable (no adapter)": run("swap"),
        "onnx-cpu-int8 merged": run("int8"),
    }
    if not args.skip_optimum:
        opt = OrtFile(optimum_int8(merged_hf, work))
        runners["optimum export + ORT dynamic int8"] = opt.run
    enc = tok(load_eval().texts[:1], padding="max_length", max_length=SEQ, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    ms = interleaved(runners, ids, mask, args.rounds)
    # the swappable graph's cost at batch 8 too (issue 16's shapes), the same three graphs interleaved
    slots = {k: runners[k] for k in ("onnx-cpu merged fp32", "onnx-cpu swappable (adapter on)",
                                     "onnx-cpu swappable (no adapter)")}
    ms8 = interleaved(slots, np.repeat(ids, 8, 0), np.repeat(mask, 8, 0), max(args.rounds // 4, 5))

    texts = load_eval().texts
    ref = reference_outputs(base, original, Task.SEQUENCE_CLASSIFICATION, tok, texts)
    fid = {k: fidelity(fn, ref, tok, texts) for k, fn in runners.items() if k not in ("pytorch eager + unmerged PEFT", "onnx-cpu swappable (no adapter)")}

    # adapter activation vs a new session
    lora = ort.LoraAdapter()
    t0 = time.perf_counter()
    for _ in range(100):
        lora = ort.LoraAdapter()
        lora.Load(str(work / "swap" / ADAPTER_DIR / "sora.onnx_adapter"))
    load_s = (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    for _ in range(1000):
        ro = ort.RunOptions()
        ro.add_active_adapter(lora)
    activate_s = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for _ in range(5):
        ort.InferenceSession(str(work / "swap" / MODEL_FILE), session_options(), providers=["CPUExecutionProvider"])
    session_s = (time.perf_counter() - t0) / 5

    anchor = ms["pytorch eager + unmerged PEFT"]
    print(f"\nMiniLM classifier + SoRA example adapter, b1 s{SEQ}, median of {args.rounds} interleaved rounds")
    print(f"{'runner':40} {'ms':>8} {'speed-up vs eager':>18} {'agree':>7} {'max|Δlogit|':>12}")
    for k, v in ms.items():
        f = fid.get(k, {})
        print(f"{k:40} {v:8.2f} {anchor / v:17.2f}x {f.get('label_agreement', 1.0):7.3f} {f.get('max_abs_logit', 0.0):12.3g}")
    print("\nratios")
    print(f"  int8 artifact vs eager PyTorch+PEFT: {anchor / ms['onnx-cpu-int8 merged']:.2f}x faster (goal >= 3)")
    print(f"  fp32 merged artifact vs eager:       {anchor / ms['onnx-cpu merged fp32']:.2f}x faster")
    if "optimum export + ORT dynamic int8" in ms:
        print(f"  int8 artifact time / optimum int8:   {ms['onnx-cpu-int8 merged'] / ms['optimum export + ORT dynamic int8']:.3f} (goal <= 1.0)")
    n_slots = len(json.loads((work / "swap" / "manifest.json").read_text())["decisions"]["lora_slot_modules"])
    print(f"  swappable graph: {n_slots} LoRA slots (every linear layer of the 6 blocks); the merged graph has "
          "no LoRA inputs, so it is also the base exported without them")
    for label, table in ((f"b1 s{SEQ}", ms), (f"b8 s{SEQ}", ms8)):
        merged = table["onnx-cpu merged fp32"]
        print(f"  {label} swappable (adapter on) / merged:       "
              f"{table['onnx-cpu swappable (adapter on)'] / merged:.3f} (goal <= 1.03)")
        print(f"  {label} swappable (no adapter) / no LoRA inputs: "
              f"{table['onnx-cpu swappable (no adapter)'] / merged:.3f} (goal <= 1.02)")
    print(f"  new InferenceSession / activation:   {session_s / activate_s:,.0f}x  ({session_s * 1e3:.1f} ms vs {activate_s * 1e6:.2f} us)")
    print(f"  new InferenceSession / adapter load: {session_s / load_s:,.0f}x  (load {load_s * 1e3:.2f} ms)")
    for k, v in wall.items():
        print(f"  wall time of `loradeploy {k}`: {v:.1f} s" + (" (goal <= 60 s)" if "demo" in k else ""))
    (work / "results.json").write_text(json.dumps({"ms": ms, "ms_b8": ms8, "fidelity": fid, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
