"""ExecuTorch causal-LM target (issue 38 item 4) next to llama.cpp, measured side by side in one run
on Gemma 3 270M with the shipped SoRA Gemma adapter:

    python benchmarks/executorch_lm.py [--rounds 5] [--tokens 32] [--work DIR]

Artifacts (kept in ``--work``; delete it to rebuild), each exported and validated by loradeploy on
the first 8 shipped LM eval texts:

* ``et``: ``--target executorch`` swappable (the KV-cache program, XNNPACK fp32, the adapter's
  factors fed as method inputs);
* ``gguf-f32`` / ``gguf-f16``: ``--target gguf-cpu`` (llama.cpp, F16 adapter GGUF) on the same
  base in the same precision class: the gemma3-270m Q4_K_M GGUF re-typed to F32 / F16 by
  llama.cpp's own quantizer (``llama_model_quantize``, requantize allowed: every tensor
  dequantized, then stored as F32 / F16) — the weights the ExecuTorch program holds in fp32
  (transformers dequantizes the same GGUF), F16 rounding them.

Speed: ``tg``, greedy decoding of ``--tokens`` tokens after a fixed 8-token prompt, and ``pp128``,
one 128-token prompt's logits, each variant once per round, interleaved round by round, in
loradeploy's sessions at the machine's core count. Ratios are of medians.
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
sys.path.insert(0, str(REPO))
from benchmarks.onnx_lm import ADAPTER, PROMPT, run_cli  # noqa: E402  the same Gemma adapter, prompt and CLI call
EVAL_TEXTS = 8


def _quick(work: Path, name: str) -> Path:
    from loradeploy.profile import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text())
    data.update({"warmup": 1, "runs": 4, "shapes": [{"batch": 1, "seq": 128}]})
    data["budgets"] = {k: v for k, v in data["budgets"].items() if k != "latency_p95_ms"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _retyped_gguf(work: Path, kind: str) -> Path:
    """The gemma3-270m GGUF with every tensor re-typed to ``kind`` (f32/f16) by llama.cpp."""
    import llama_cpp

    from loradeploy.base import resolve_base

    out = work / f"gemma3-270m-{kind}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[kind]
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(resolve_base("gemma3-270m")).encode(), str(out).encode(), params) != 0:
            sys.exit(f"llama_model_quantize failed writing {out}")
    return out


def build(work: Path) -> dict:
    from loradeploy.evaldata import DEFAULT_LM_EVAL

    work.mkdir(parents=True, exist_ok=True)
    ev = work / "eval.txt"
    ev.write_text("\n".join(DEFAULT_LM_EVAL.read_text().splitlines()[:EVAL_TEXTS]) + "\n")
    info_file = work / "build.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    adapter = f"sora-gemma={ADAPTER}"
    if not (work / "et" / "manifest.json").exists():
        info["export_et_s"] = run_cli("export", "--base", "gemma3-270m", "--adapter", adapter, "--target",
                                   str(_quick(work, "executorch")), "--eval", str(ev), "-o", str(work / "et"),
                                   "--overwrite")
    for kind in ("f32", "f16"):
        if not (work / f"gguf-{kind}" / "manifest.json").exists():
            info[f"export_gguf_{kind}_s"] = run_cli("export", "--base", str(_retyped_gguf(work, kind)), "--adapter",
                                                 adapter, "--target", str(_quick(work, "gguf-cpu")), "--eval", str(ev),
                                                 "-o", str(work / f"gguf-{kind}"), "--overwrite")
    info_file.write_text(json.dumps(info, indent=1))
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loradeploy-bench-et-lm")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = build(args.work)
    from loradeploy import runtime

    threads = len(os.sched_getaffinity(0))
    sessions = {"et": runtime.open(args.work / "et", threads=threads),
                "gguf-f32": runtime.open(args.work / "gguf-f32", threads=threads, workers=1),
                "gguf-f16": runtime.open(args.work / "gguf-f16", threads=threads, workers=1)}
    long_prompt = PROMPT + [3 + (1000 + i) % 200000 for i in range(128 - len(PROMPT))]
    variants = {
        "ExecuTorch fp32, adapter on": ("et", "sora-gemma"),
        "ExecuTorch fp32, no adapter": ("et", None),
        "llama.cpp F32, adapter on": ("gguf-f32", "sora-gemma"),
        "llama.cpp F16, adapter on": ("gguf-f16", "sora-gemma"),
    }
    for session, adapter in variants.values():  # warm-up
        sessions[session].greedy(PROMPT, adapter, 4)
        sessions[session].logits(long_prompt, adapter)
    tg: dict[str, list[float]] = {k: [] for k in variants}
    pp: dict[str, list[float]] = {k: [] for k in variants}
    same = {}
    for _ in range(args.rounds):
        for name, (session, adapter) in variants.items():
            t0 = time.perf_counter()
            got = sessions[session].greedy(PROMPT, adapter, args.tokens)
            tg[name].append(time.perf_counter() - t0)
            assert len(got) == args.tokens, (name, len(got))
            same[name] = got
            t0 = time.perf_counter()
            sessions[session].logits(long_prompt, adapter)
            pp[name].append(time.perf_counter() - t0)
    tg_tps = {k: args.tokens / statistics.median(v) for k, v in tg.items()}
    pp_tps = {k: len(long_prompt) / statistics.median(v) for k, v in pp.items()}
    ratios = {f"ExecuTorch fp32 / llama.cpp {k} (adapter on), {what}": tps["ExecuTorch fp32, adapter on"]
              / tps[f"llama.cpp {k}, adapter on"] for k in ("F32", "F16") for what, tps in (("tg", tg_tps), ("pp128", pp_tps))}
    ratios["ExecuTorch adapter on / no adapter, tg"] = tg_tps["ExecuTorch fp32, adapter on"] / tg_tps["ExecuTorch fp32, no adapter"]
    fidelity = {}
    for folder in ("et", "gguf-f32", "gguf-f16"):
        m = json.loads((args.work / folder / "manifest.json").read_text())["validation"]
        fidelity[folder] = {k: m["metrics"]["sora-gemma"].get(k) for k in ("kl_mean", "top1_agreement", "ppl_ratio",
                                                                         "greedy_match")}
        fidelity[folder]["passed"] = m["passed"]
    agree = {k: same[k] == same["ExecuTorch fp32, adapter on"] for k in variants if "adapter on" in k}
    result = {"tg_tokens_per_s": tg_tps, "pp128_tokens_per_s": pp_tps, "ratios": ratios, "fidelity": fidelity,
              "greedy_tokens_equal_to_executorch": agree, "build": info, "threads": threads}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Gemma 3 270M + sora-gemma, greedy {args.tokens} tokens after {len(PROMPT)} and one 128-token prompt, "
          f"{args.rounds} interleaved rounds, {threads} threads")
    print(f"{'variant':34} {'tg tok/s':>9} {'pp128 tok/s':>12}")
    for k in variants:
        print(f"{k:34} {tg_tps[k]:9.1f} {pp_tps[k]:12.1f}")
    for k, v in ratios.items():
        print(f"{k:60} {v:6.2f}")
    for k, v in fidelity.items():
        print(f"{k:10} validation: " + ", ".join(f"{a}={b}" for a, b in v.items()))
    print("greedy tokens equal to ExecuTorch's:", agree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
