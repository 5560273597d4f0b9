"""ONNX causal-LM target (issue 15), ratios measured side by side in one run on Gemma 3 270M with
the shipped SoRA Gemma adapter:

    python benchmarks/onnx_lm.py [--rounds 5] [--tokens 64] [--work DIR]

Artifacts (kept in ``--work``; delete it to rebuild):

* ``swappable``: ``loradeploy export --target onnx-cpu-int4 --mode swappable`` (timed, with its full
  validation: the export wall-time goal and the fidelity goals come from its manifest);
* ``gguf-blocks``: ``loradeploy export --target onnx-cpu-gguf`` (the GGUF's own blocks as
  MatMulNBits; timed and validated the same way);
* ``merged``: the same profile, ``--mode merged``;
* ``no-lora``: the builder's int4 decoder of the base, without LoRA inputs;
* ``genai-lora``: onnxruntime-genai's own builder given the adapter as a PEFT folder
  (``adapter_path``; written by ``loradeploy prune``): the adapter baked into the graph at PEFT's
  ranks, packed Q/K/V off; its int4 is round to nearest (onnxruntime's k-quant, loradeploy's int4,
  fails on the builder's rank-8 ``lora_B`` MatMuls), the same MatMulNBits kernel;
* ``gguf``: ``loradeploy export --target gguf-cpu`` (llama.cpp, F16 adapter GGUF).

``--norms-cost [--profile onnx-cpu-int4]`` (issue 36) measures only what RMSNorm inputs cost: the
swappable graph with the default slots (``blocks,norms``: every RMSNorm weight an overridable input)
against ``--slots blocks`` (norms constant), prompt processing of 128 tokens and greedy generation,
adapter on and off, in loradeploy's session, interleaved; and the normalization ops onnxruntime's
load-time optimizer leaves in each graph.

Generation speed: greedy decoding of ``--tokens`` tokens after a fixed 8-token prompt, each
variant once per round, the variants interleaved round by round; ONNX graphs run in
onnxruntime-genai (``og.Generator``, the adapter activated with ``set_active_adapter``) and again
in loradeploy's own session (onnxruntime directly: ``runtime.open(...).greedy``, the same KV-cache
graph fed by a Python loop), llama.cpp through loradeploy's session, all at the machine's core
count. Ratios are of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "examples" / "adapters" / "sora-gemma"
PROMPT = [2, 818, 5279, 529, 7001, 563, 506, 1902]  # "<bos>The capital of France is the first" (Gemma ids)


def run_cli(*argv: str) -> float:
    """``loradeploy ARGV`` in a fresh process; its wall time in seconds (exit 1, a budget failed, is fine)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", *argv], capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: built, a budget failed (reported below from the manifest)
        sys.exit(f"loradeploy {' '.join(argv[:1])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def _quick(work: Path, name: str) -> Path:
    data = yaml.safe_load((REPO / "targets" / f"{name}.yaml").read_text())
    data.update(warmup=0, runs=1, shapes=[{"batch": 1, "seq": 16}])
    path = work / f"{name}-quick.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def build(work: Path) -> dict:
    """The artifacts (reused when present) and the timed exports' wall times."""
    from loradeploy.base import hf_folder, resolve_base
    from loradeploy.plugins.onnxruntime import lm_exporter as onnx_lm

    work.mkdir(parents=True, exist_ok=True)
    times = work / "export_s.json"
    info = json.loads(times.read_text()) if times.is_file() else {}
    for key, folder, profile in (("export_s", "swappable", "onnx-cpu-int4"), ("export_gguf_s", "gguf-blocks", "onnx-cpu-gguf")):
        if not (work / folder / "manifest.json").is_file():
            info[key] = run_cli("export", "--base", "gemma3-270m", "--adapter", f"sora-gemma={ADAPTER}", "--target",
                             profile, "--mode", "swappable", "-o", str(work / folder), "--overwrite")
            times.write_text(json.dumps(info))
    if not (work / "merged" / "manifest.json").is_file():
        run_cli("export", "--base", "gemma3-270m", "--adapter", f"sora-gemma={ADAPTER}", "--target",
             str(_quick(work, "onnx-cpu-int4")), "--mode", "merged", "-o", str(work / "merged"), "--overwrite")
    if not (work / "adapter-slots" / "manifest.json").is_file():  # slots only where the adapter has modules
        run_cli("export", "--base", "gemma3-270m", "--adapter", f"sora-gemma={ADAPTER}", "--target",
             str(_quick(work, "onnx-cpu-int4")), "--mode", "swappable", "--slots", "adapters",
             "-o", str(work / "adapter-slots"), "--overwrite")
    hf = hf_folder(resolve_base("gemma3-270m"))
    if not (work / "no-lora" / "genai_config.json").is_file():
        onnx_lm.build_decoder(hf, work / "no-lora", "int4", work / "cache")
    if not (work / "genai-lora" / "genai_config.json").is_file():
        run_cli("prune", str(ADAPTER), "-o", str(work / "peft"), "--overwrite")
        # round to nearest, the builder's default: onnxruntime 1.32's k-quant cannot pack the zero
        # points of a rank-8 lora_B (one block per column over an odd count); same kernel and speed
        onnx_lm.build_decoder(hf, work / "genai-lora", "int4", work / "cache",
                              (f"adapter_path={work / 'peft'}", "algo_config=default"))
    if not (work / "gguf" / "manifest.json").is_file():
        run_cli("export", "--base", "gemma3-270m", "--adapter", f"sora-gemma={ADAPTER}", "--target",
             str(_quick(work, "gguf-cpu")), "-o", str(work / "gguf"), "--overwrite")
    return info


def og_generator(folder: Path, adapter: str | None = None):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)

    def run(n: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT) + n, min_length=len(PROMPT) + n, do_sample=False)
        gen = og.Generator(model, params)
        if adapters is not None:
            gen.set_active_adapter(adapters, adapter)
        gen.append_tokens(PROMPT)
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out
    run.keep = (model, adapters)
    return run


def norms_cost(work: Path, profile: str, rounds: int) -> int:
    """pp128 and per-token latency of the default swappable graph (norms as inputs) relative to
    ``--slots blocks``, with the sora-gemma adapter and without."""
    import collections

    import onnx
    import onnxruntime as ort

    from loradeploy import runtime
    from loradeploy.evaldata import DEFAULT_LM_EVAL
    from loradeploy.plugins.onnxruntime.ort import session_options

    work.mkdir(parents=True, exist_ok=True)
    ev = work / "eval.txt"
    ev.write_text("\n".join(DEFAULT_LM_EVAL.read_text().splitlines()[:4]) + "\n")
    graphs = {"norms": work / f"{profile}-norms", "blocks": work / f"{profile}-blocks"}
    for label, out in graphs.items():
        if not (out / "manifest.json").is_file():
            run_cli("export", "--base", "gemma3-270m", "--adapter", f"sora-gemma={ADAPTER}", "--target",
                 str(_quick(work, profile)), "--mode", "swappable", "--eval", str(ev), "-o", str(out), "--overwrite",
                 *(["--slots", "blocks"] if label == "blocks" else []))
    sessions = {label: runtime.open(out, workers=1) for label, out in graphs.items()}
    prompt = PROMPT + [3 + (1000 + i) % 200000 for i in range(128 - len(PROMPT))]
    runs = {f"{label} {kind} {a or 'none'}": (lambda s, k, a: (lambda: s.logits(prompt, a)) if k == "pp128"
                                              else (lambda: s.greedy(PROMPT, a, 32)))(s, kind, a)
            for kind in ("pp128", "tg") for a in ("sora-gemma", None) for label, s in sessions.items()}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):  # every other round in reverse order: neither graph always runs first
        for k, run in (list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]):
            t0 = time.perf_counter()
            run()
            times[k].append((time.perf_counter() - t0) * 1e3 / (1 if k.split()[1] == "pp128" else 32))
    print(f"Gemma 3 270M + sora-gemma, {profile} swappable: norms as inputs vs --slots blocks, median of "
          f"{rounds} interleaved rounds (alternate ones reversed), {os.cpu_count()} cores (tg: ms per token of 32 after {len(PROMPT)})")
    print(f"{'kind':6} {'adapter':11} {'norms ms':>9} {'blocks ms':>9} {'ratio':>7}")
    for kind in ("pp128", "tg"):
        for a in ("sora-gemma", "none"):
            new, old = (statistics.median(times[f"{label} {kind} {a}"]) for label in ("norms", "blocks"))
            print(f"{kind:6} {a:11} {new:9.2f} {old:9.2f} {new / old:7.3f}")
    for label, out in graphs.items():  # what the session's optimizer (ORT_ENABLE_ALL) leaves
        so = session_options()
        so.optimized_model_filepath = str(work / f"{profile}-{label}.optimized.onnx")
        ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
        ops = collections.Counter(n.op_type for n in optimized.graph.node)
        norms = json.loads((out / "manifest.json").read_text())["decisions"]["norm_inputs"]
        print(f"{label}: {norms} norm inputs; after load-time optimization "
              f"{ {k: v for k, v in sorted(ops.items()) if 'Normalization' in k} }")
    for s in sessions.values():
        s.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loradeploy-bench-onnx-lm")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build the artifacts into --work and stop")
    ap.add_argument("--norms-cost", action="store_true", help="only the cost of RMSNorm inputs (issue 36)")
    ap.add_argument("--profile", default="onnx-cpu-int4", help="--norms-cost: the profile exported")
    args = ap.parse_args()
    if args.norms_cost:
        return norms_cost(args.work / "norms-cost", args.profile, args.rounds)
    info = build(args.work)
    if args.build_only:
        return 0
    from loradeploy import runtime

    llama = runtime.open(args.work / "gguf", workers=1)
    ours = {name: runtime.open(args.work / name, workers=1) for name in ("swappable", "merged", "gguf-blocks")}
    variants = {
        "swappable, adapter on": og_generator(args.work / "swappable", "sora-gemma"),
        "onnx-cpu-gguf, adapter on": og_generator(args.work / "gguf-blocks", "sora-gemma"),
        "swappable, no adapter": og_generator(args.work / "swappable"),
        "--slots adapters, adapter on": og_generator(args.work / "adapter-slots", "sora-gemma"),
        "--slots adapters, no adapter": og_generator(args.work / "adapter-slots"),
        "merged": og_generator(args.work / "merged"),
        "no LoRA inputs": og_generator(args.work / "no-lora"),
        "genai builder + adapter": og_generator(args.work / "genai-lora"),
        "llama.cpp gguf-cpu, adapter on": lambda n: llama.greedy(PROMPT, "sora-gemma", n),
        # the same graphs in loradeploy's own session (onnxruntime directly, its KV-cache loop)
        "session: swappable, adapter on": lambda n: ours["swappable"].greedy(PROMPT, "sora-gemma", n),
        "session: swappable, no adapter": lambda n: ours["swappable"].greedy(PROMPT, None, n),
        "session: merged": lambda n: ours["merged"].greedy(PROMPT, None, n),
        "session: onnx-cpu-gguf, adapter on": lambda n: ours["gguf-blocks"].greedy(PROMPT, "sora-gemma", n),
    }
    for run in variants.values():  # warm-up
        run(8)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            got = run(args.tokens)
            times[name].append(time.perf_counter() - t0)
            assert len(got) == args.tokens, (name, len(got))
    tps = {k: args.tokens / statistics.median(v) for k, v in times.items()}
    manifest = json.loads((args.work / "swappable" / "manifest.json").read_text())
    m = manifest["validation"]["metrics"]["sora-gemma"]
    ratios = {
        "onnx-cpu-int4 swappable (adapter on) / gguf-cpu llama.cpp": (
            tps["swappable, adapter on"] / tps["llama.cpp gguf-cpu, adapter on"], ">= 1.0"),
        "onnx-cpu-gguf swappable (adapter on) / gguf-cpu llama.cpp": (
            tps["onnx-cpu-gguf, adapter on"] / tps["llama.cpp gguf-cpu, adapter on"], "info"),
        "swappable (adapter on) / merged": (tps["swappable, adapter on"] / tps["merged"], ">= 0.95"),
        "swappable (no adapter) / graph without LoRA inputs": (
            tps["swappable, no adapter"] / tps["no LoRA inputs"], ">= 0.98"),
        "session: onnx-cpu-int4 swappable (adapter on) / llama.cpp": (
            tps["session: swappable, adapter on"] / tps["llama.cpp gguf-cpu, adapter on"], ">= 1.0"),
        "session: swappable (adapter on) / merged": (
            tps["session: swappable, adapter on"] / tps["session: merged"], ">= 0.95"),
        "session: swappable (no adapter) / merged": (
            tps["session: swappable, no adapter"] / tps["session: merged"], "info"),
        "--slots adapters: swappable (adapter on) / merged": (
            tps["--slots adapters, adapter on"] / tps["merged"], ">= 0.95"),
        "--slots adapters: swappable (no adapter) / graph without LoRA inputs": (
            tps["--slots adapters, no adapter"] / tps["no LoRA inputs"], ">= 0.98"),
        "--slots adapters (adapter on) / onnxruntime-genai builder with the adapter": (
            tps["--slots adapters, adapter on"] / tps["genai builder + adapter"], ">= 1.1"),
        "session: onnx-cpu-gguf (adapter on) / llama.cpp": (
            tps["session: onnx-cpu-gguf, adapter on"] / tps["llama.cpp gguf-cpu, adapter on"], "info"),
        "swappable (adapter on) / onnxruntime-genai builder with the adapter": (
            tps["swappable, adapter on"] / tps["genai builder + adapter"], ">= 1.1"),
    }
    g_manifest = json.loads((args.work / "gguf-blocks" / "manifest.json").read_text())
    g = g_manifest["validation"]["metrics"]["sora-gemma"]
    fidelity = {"onnx-cpu-int4 kl_excess_vs_base": (m["kl_excess_vs_base"], "<= 0.005"),
                "onnx-cpu-int4 top1_drop_vs_base (points)": (100 * m["top1_drop_vs_base"], "<= 2"),
                "onnx-cpu-int4 base alone kl_mean": (manifest["validation"]["metrics"]["base alone"]["kl_mean"], "info"),
                "onnx-cpu-gguf kl_excess_vs_base": (g["kl_excess_vs_base"], "<= 0.005"),
                "onnx-cpu-gguf top1_drop_vs_base (points)": (100 * g["top1_drop_vs_base"], "<= 2"),
                "onnx-cpu-gguf base alone kl_mean": (g_manifest["validation"]["metrics"]["base alone"]["kl_mean"], "info"),
                "onnx-cpu-int4 export wall time incl. validation, s": (info.get("export_s", float("nan")), "<= 120"),
                "onnx-cpu-gguf export wall time incl. validation, s": (info.get("export_gguf_s", float("nan")), "<= 120")}
    if args.json:
        print(json.dumps({"tokens_per_s": tps, "ratios": {k: v[0] for k, v in ratios.items()},
                          "fidelity": {k: v[0] for k, v in fidelity.items()}}, indent=2))
        return 0
    print(f"Gemma 3 270M + sora-gemma, greedy {args.tokens} tokens after {len(PROMPT)}, {args.rounds} interleaved "
          f"rounds, {os.cpu_count()} cores")
    for k, v in tps.items():
        print(f"  {k:38s} {v:7.1f} tok/s")
    for k, (v, goal) in {**ratios, **fidelity}.items():
        print(f"  {k:66s} {v:9.4f}  (goal {goal})")
    llama.close()
    for session in ours.values():
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
