"""The measures behind the LM budgets of the built-in profiles (issue 34): the shipped Gemma
adapters exported on Gemma 3 270M for each profile that takes causal LMs, validated on the first
``--texts`` shipped LM eval texts with the profile's own timing, the base loaded once:

    python benchmarks/lm_budgets.py [--profiles onnx-cpu-int4 gguf-cpu …] [--adapters sora-gemma …]
                                    [--modes merged,swappable] [--texts 16] [--work DIR]

Prints one row per (profile, mode, adapter) — each LM measure and the latency rows — and writes
them to ``DIR/lm_budgets.json``. The profiles' YAML comments cite these rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("kl_mean", "top1_agreement", "ppl_ratio", "adapter_effect_kept", "greedy_match", "kl_excess_vs_base",
            "top1_drop_vs_base")
_BASES: dict = {}


def _load_base(base: str, entries: tuple):
    from loradeploy.job import load_base_for

    if base not in _BASES:
        _BASES[base] = load_base_for(base, entries)
    return _BASES[base]


def _lm_profiles() -> list[str]:
    from loradeploy import registry
    from loradeploy.profile import load_profile, profile_paths

    return [name for name in sorted(profile_paths()) if "causal-lm" in
            registry.get((p := load_profile(name)).runtime).tasks.get(p.precision, ())]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="*", help="default: every built-in profile that takes causal LMs")
    ap.add_argument("--adapters", nargs="*", default=["sora-gemma"], help="folders under examples/adapters")
    ap.add_argument("--modes", help="comma-separated; default: the profile's mode")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    from loradeploy.cli import quiet_third_party_logs
    from loradeploy.evaldata import DEFAULT_LM_EVAL
    from loradeploy.export import ExportConfig, export
    from loradeploy.job import AdapterInputs, AdapterSpec

    quiet_third_party_logs()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lm-budgets-"))
    work.mkdir(parents=True, exist_ok=True)
    eval_file = work / "eval.txt"
    eval_file.write_text("\n".join(DEFAULT_LM_EVAL.read_text().splitlines()[:args.texts]) + "\n")
    specs = [AdapterSpec(a, REPO / "examples" / "adapters" / a) for a in args.adapters]
    rows = []
    for profile in args.profiles or _lm_profiles():
        for mode in (args.modes.split(",") if args.modes else [None]):
            n = len(specs) if mode != "merged" else 1
            t0 = time.perf_counter()
            manifest = export(ExportConfig("gemma3-270m", AdapterInputs.of(specs[:n]), profile,
                                           work / f"{profile}-{mode or 'default'}", mode, eval_file, overwrite=True))
            v = manifest["validation"]
            for label, m in v["metrics"].items():
                row = {"profile": profile, "mode": manifest["mode"], "adapter": label, "texts": args.texts,
                       "tokens": m.get("tokens"), **{k: m[k] for k in MEASURES if k in m}}
                if label != "base alone":
                    row["latency_p95_ms"] = {k: s["p95_ms"] for k, s in v["latency"].get("shapes", {}).items()}
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"# {profile} {manifest['mode']}: {v.get('verdict')} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (work / "lm_budgets.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
