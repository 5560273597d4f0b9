"""bitsandbytes target: latency and peak RSS of each bnb artifact vs the fp32 PyTorch model,
as ratios measured in one run (MiniLM classifier + the SoRA example adapter, CPU).

    python benchmarks/bnb_cpu.py [--rounds 3] [--runs 10]

Every artifact (and the fp32 baseline: the same model merged in fp32, loaded by the same
transformers runner) is timed by the latency worker in a fresh process; rounds alternate the
order, and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTER = REPO / "examples" / "adapters" / "sora"
ARTIFACTS = [("bnb-nf4", "merged"), ("bnb-nf4", "swappable"), ("bnb-nf4-dq", "merged"), ("bnb-fp4", "merged"),
             ("bnb-int8", "merged"), ("bnb-int8", "swappable")]


def fp32_baseline(folder: Path) -> None:
    from loradeploy.adapters import read_adapter
    from loradeploy.base import load_tokenizer, load_torch_model, resolve_base
    from loradeploy.ir import Task
    from loradeploy.merge import merge_into

    base = resolve_base("minilm")
    model = merge_into(load_torch_model(base, Task.SEQUENCE_CLASSIFICATION, 2), read_adapter(ADAPTER))
    model.save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    (folder / "manifest.json").write_text(json.dumps({"task": "sequence-classification", "adapters": []}))


def worker(art: Path, adapter: str | None, runs: int) -> dict:
    cmd = [sys.executable, "-m", "loradeploy.runtime.latency_worker", str(art), "--shape", "1x128",
           "--shape", "8x128", "--warmup", "2", "--runs", str(runs)] + (["--adapter", adapter] if adapter else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bnb-"))
    fp32_baseline(work / "fp32")
    arts = {"fp32 PyTorch (merged)": (work / "fp32", None)}
    for target, mode in ARTIFACTS:
        out = work / f"{target}-{mode}"
        subprocess.run([sys.executable, "-m", "loradeploy.cli", "export", "--base", "minilm", "--adapter",
                        f"sora={ADAPTER}", "--target", target, "--mode", mode, "-o", str(out)], check=True,
                       capture_output=True)
        arts[f"{target} {mode}"] = (out, "sora" if mode == "swappable" else None)
    results = {k: [] for k in arts}
    for r in range(args.rounds):
        order = list(arts.items()) if r % 2 == 0 else list(reversed(arts.items()))
        for name, (art, adapter) in order:
            results[name].append(worker(art, adapter, args.runs))
    base = results["fp32 PyTorch (merged)"]
    med = lambda rs, key: statistics.median(x["shapes"][key]["p50_ms"] for x in rs)  # noqa: E731
    rss = lambda rs: statistics.median(x["peak_rss_mb"] for x in rs)  # noqa: E731
    print(f"MiniLM + SoRA, CPU, p50 per shape, median of {args.rounds} rounds (fresh process each)")
    print("fidelity: the artifact's own validation vs the fp32 reference (500 eval sentences)")
    print(f"{'artifact':28} {'b1 ms':>8} {'ratio':>7} {'b8 ms':>8} {'ratio':>7} {'RSS MB':>8} {'ratio':>7} "
          f"{'MB on disk':>10} {'agree':>6} {'mean|Δlogit|':>12}")
    for name, rs in results.items():
        size = sum(p.stat().st_size for p in arts[name][0].rglob("*") if p.is_file()) / 2**20
        manifest = json.loads((arts[name][0] / "manifest.json").read_text())
        fid = next(iter(manifest.get("validation", {}).get("metrics", {}).values()), {})
        print(f"{name:28} {med(rs, 'b1xs128'):8.1f} {med(rs, 'b1xs128') / med(base, 'b1xs128'):7.2f} "
              f"{med(rs, 'b8xs128'):8.1f} {med(rs, 'b8xs128') / med(base, 'b8xs128'):7.2f} "
              f"{rss(rs):8.0f} {rss(rs) / rss(base):7.2f} {size:10.1f} "
              f"{fid.get('label_agreement', 1.0):6.3f} {fid.get('mean_abs_logit', 0.0):12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
