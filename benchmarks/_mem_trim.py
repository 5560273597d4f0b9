"""RSS added per loaded adapter vs the adapter file's bytes, per runtime, for 1, 8 and 32
loaded adapters (goal: ≤ 1.5×; ExecuTorch's LoRA reports +1.1 GB RSS for a 50 MB adapter).

    python benchmarks/adapter_memory.py [--base minilm,gemma3-270m] [--counts 1,8,32]
                                        [--onnx ART] [--gguf ART] [--work DIR] [--json]

Each configuration runs in a fresh process (``--child``): ``loradeploy.runtime.open`` on a
swappable artifact with no adapter loaded, one warm-up run on the base alone and one load +
unload of a spare adapter of the artifact (one-time costs: imported modules, the base's
tensor table the checks read; reported apart as "first load"), then ``gc.collect()`` and the
baseline VmRSS (/proc/self/status). Then N adapters are loaded (``Session.load_adapter``,
checks included) and each serves one request; after ``gc.collect()`` VmRSS again. RSS added /
(sum of the N adapter files' bytes) is the ratio; "marginal" is the same between two counts
(fixed costs cancel). The artifacts are the soak's (``benchmarks/soak.py``: adapters derived
from the shipped examples, exported into one swappable artifact), reused from ``--work``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from soak import BASES, DEFAULT_WORK, adapter_files, artifact_runtime, prepare_in_subprocess, rss_bytes  # noqa: E402

GOAL = 1.5
TEXT = {"onnxruntime": "The staff were lovely and the room was clean.", "llama.cpp": "The hotel room was"}


def measure(art: Path, n: int) -> dict:
    """In this process: RSS added by ``n`` loaded adapters that each served one request."""
    from loradeploy import runtime

    files = adapter_files(art)
    names = sorted(files)
    if len(names) < n + 1:
        raise SystemExit(f"{art} holds {len(names)} adapters; {n} + 1 spare are needed")
    rt = artifact_runtime(art)
    session = runtime.open(art, adapters=False, threads=1, workers=1)
    request = session.encode([TEXT[rt]])
    session.run(request)  # warm-up on the base alone
    gc.collect(); __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    opened = rss_bytes()
    spare = names[-1]
    session.load_adapter("spare", files[spare])
    session.run(request, "spare")
    session.unload_adapter("spare")
    gc.collect(); __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    baseline = rss_bytes()
    chosen = names[:n]
    for name in chosen:
        session.load_adapter(name, files[name])
    gc.collect(); __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    loaded = rss_bytes()
    for name in chosen:
        session.run(request, name)
    gc.collect(); __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    served = rss_bytes()
    file_bytes = sum(files[name].stat().st_size for name in chosen)
    record = {"runtime": rt, "n": n, "file_bytes": file_bytes, "rss_opened": opened,
              "first_load": baseline - opened, "rss_baseline": baseline, "added_loaded": loaded - baseline,
              "added": served - baseline, "ratio": (served - baseline) / file_bytes}
    session.close()
    return record


def run_child(art: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(art), str(n)], capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"child {art} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MB"


def table(records: list[dict]) -> str:
    head = (f"{'runtime':<12} {'N':>3} {'file bytes total':>17} {'RSS added':>10} {'ratio':>7} {'goal':>8} "
            f"{'added (loaded, not run)':>24} {'marginal':>9} {'first load':>11}")
    lines = [head, "-" * len(head)]
    prev: dict[str, dict] = {}
    for r in records:
        p = prev.get(r["runtime"])
        marginal = (r["added"] - p["added"]) / (r["file_bytes"] - p["file_bytes"]) if p else None
        prev[r["runtime"]] = r
        lines.append(f"{r['runtime']:<12} {r['n']:>3} {r['file_bytes']:>11,} ({r['file_bytes'] / 2**20:.1f}M) "
                     f"{_mb(r['added']):>10} {r['ratio']:>6.2f}x {'≤1.5x ' + ('ok' if r['ratio'] <= GOAL else 'NO'):>8} "
                     f"{_mb(r['added_loaded']):>24} {f'{marginal:.2f}x' if marginal is not None else '-':>9} "
                     f"{_mb(r['first_load']):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="minilm,gemma3-270m")
    ap.add_argument("--counts", default="1,8,32")
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--adapters", type=int, default=50, help="adapters in the artifact exported when none is given")
    ap.add_argument("--child", nargs=2, metavar=("ART", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), int(args.child[1]))))
        return 0
    counts = [int(c) for c in args.counts.split(",")]
    records = []
    for base in args.base.split(","):
        if base not in BASES:
            ap.error(f"unknown base {base} (known: {', '.join(BASES)})")
        art = (args.onnx if base == "minilm" else args.gguf) or prepare_in_subprocess(base, args.adapters, args.work)
        for n in counts:
            t0 = time.perf_counter()
            records.append({"artifact": str(art), **run_child(art, n)})
            print(f"{base} N={n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(records, indent=2) if args.json else table(records))
    return 0 if all(r["ratio"] <= GOAL for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
