"""A/B runtime soak: many requests while many distinct adapters are loaded, swapped in and
unloaded in cycles; RSS, open file descriptors and every answer checked.

    python benchmarks/soak.py [--base minilm,gemma3-270m] [--requests 100000] [--adapters 50]
                              [--resident 8] [--workers N] [--onnx ART] [--gguf ART]
                              [--work DIR] [--max-seconds 1800] [--json]

Per base (MiniLM on onnxruntime, ``onnx-cpu``; Gemma 3 270M on llama.cpp, ``gguf-cpu``):

* ``--adapters`` distinct adapters are derived from the shipped examples (copies of the
  checkpoints with every ``lora_B`` scaled by its own factor, 0.3 to 1.7) and exported into
  ONE swappable artifact (8 eval lines, 1 timed run), kept in ``--work`` for the next run;
* one session serves ``--requests`` requests from ``--workers`` threads: most name a loaded
  adapter directly, every 4th goes through an :class:`ABRouter` with two arms, every 16th
  asks for the base alone;
* meanwhile the main thread cycles through the adapters: it loads the next one under a new
  name, unloads the oldest so that ``--resident`` stay loaded, and replaces one router arm
  (which loads the new arm's adapter and unloads the old one), over and over;
* every answer is checked against the outputs of the adapter the request used, computed
  one by one before the soak: the result's fingerprint must be that adapter's file sha256
  (for routed requests: the adapter the arm held at the request's generation) and the outputs
  equal (onnxruntime: 1e-5; llama.cpp: 1e-4 over 1,024 fixed vocabulary entries and top-1);
  adapters whose outputs differ by less than 100× that are refused up front, so a swapped
  adapter cannot pass;
* after warm-up (the first 10% of requests, or ``--warmup``, and one full cycle over every
  adapter) the RSS (/proc/self/status VmRSS) must stay within 2% of its value then, and the
  count of /proc/self/fd must not change (sampled by the thread that loads, between loads, so no
  transient file is open).

Prints one row per runtime; exits 1 when a goal fails (wrong answers, errors, RSS drift, fd
change, fewer requests than asked within ``--max-seconds``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXAMPLES = REPO / "examples" / "adapters"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "loradeploy-soak"

#: base → how its artifact is made and served
BASES = {
    "minilm": {"runtime": "onnxruntime", "target": "onnx-cpu", "sources": ("sora", "increlora", "blora"),
               "factors": (0.3, 1.7), "atol": 1e-5},
    "gemma3-270m": {"runtime": "llama.cpp", "target": "gguf-cpu", "sources": ("sora-gemma", "increlora-gemma"),
                    "factors": (0.5, 1.1), "atol": 1e-4},
}
RSS_DRIFT_MAX = 0.02
WARMUP_SHARE = 0.10
LLAMA_PROBE = 1024  # vocabulary entries compared per llama.cpp answer (the full row is 262,144 floats)
B_KEY = re.compile(r"(\.lora)?\.lora_B(\.weight|\.\d+)?$")

EVAL_LINES = 8
# short inputs: many requests per second; llama.cpp: 1 to 3 words after BOS
ONNX_TEXTS = ["good", "bad camera", "fine but slow", "awful service, never again", "great", "poor battery life",
              "nice hotel room and friendly staff", "dull", "not good at all", "would buy this again",
              "the soup was cold", "lovely", "hardly worth the price", "terrible", "works", "broken on arrival"]
LLAMA_TEXTS = ["good", "bad", "The", "I would", "great", "never", "The hotel", "awful"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- many distinct adapters in one swappable artifact ----------------------------------------

def derive_adapters(base: str, n: int, folder: Path) -> dict[str, Path]:
    """``n`` copies of the base's example adapters, copy ``i`` with every lora_B tensor
    scaled by its own factor, evenly spread over the base's ``factors`` range (so every copy's
    ΔW, and its outputs, differ; Gemma's range is narrower: an IncreLoRA copy scaled by 1.7
    leaves llama.cpp's fidelity budget)."""
    import safetensors.torch
    import torch

    sources = BASES[base]["sources"]
    out = {}
    for i in range(n):
        src = EXAMPLES / sources[i % len(sources)]
        dst = folder / f"a{i:02d}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        lo, hi = BASES[base]["factors"]
        factor = lo + (hi - lo) * i / max(n - 1, 1)
        weights = next(p for p in (dst / "adapter_model.safetensors", dst / "model.safetensors",
                                   dst / "pytorch_model.bin") if p.is_file())
        if weights.suffix == ".safetensors":
            tensors = safetensors.torch.load_file(str(weights))
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        scaled = 0
        for key in list(tensors):
            if B_KEY.search(key):
                tensors[key] = (tensors[key].float() * factor).to(tensors[key].dtype).contiguous()
                scaled += 1
        if not scaled:
            raise RuntimeError(f"{weights}: no lora_B tensor to scale")
        if weights.suffix == ".safetensors":
            safetensors.torch.save_file(tensors, str(weights))
        else:
            torch.save(tensors, weights)
        out[dst.name] = dst
    return out


def fast_profile(target: str, folder: Path) -> Path:
    """The target's profile with one timed run at one small shape (export time, not latency,
    is what matters here) and no latency budget."""
    import yaml

    from loradeploy.profile import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{target}.yaml").read_text())
    data.update({"warmup": 0, "runs": 1, "shapes": [{"batch": 1, "seq": 16}]})
    data.get("budgets", {}).pop("latency_p95_ms", None)
    path = folder / f"{target}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def eval_file(base: str, folder: Path) -> Path:
    from loradeploy.evaldata import DEFAULT_EVAL, DEFAULT_LM_EVAL

    lm = BASES[base]["runtime"] == "llama.cpp"
    src = DEFAULT_LM_EVAL if lm else DEFAULT_EVAL
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:EVAL_LINES]
    path = folder / ("eval.txt" if lm else "eval.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(base: str, n: int, work: Path) -> Path:
    """Derive ``n`` adapters and export them into one swappable artifact (``loradeploy export``,
    validated on 8 eval lines); returns the artifact. Reused when it already holds them."""
    from loradeploy.cli import main as cli

    folder = work / f"{base}-{n}"
    art = folder / "art"
    if _holds(art, n):
        return art
    folder.mkdir(parents=True, exist_ok=True)
    adapters = derive_adapters(base, n, folder / "adapters")
    argv = ["export", "--base", base, "--target", str(fast_profile(BASES[base]["target"], folder)),
            "--mode", "swappable", "--eval", str(eval_file(base, folder)), "-o", str(art), "--overwrite"]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    code = cli(argv)
    if not _holds(art, n):
        raise RuntimeError(f"loradeploy export of {n} adapters on {base} failed (exit {code})")
    if code != 0:  # written, but an adapter missed the profile's budget: the soak checks the runtime
        print(f"warning: {art}: validation failed (exit {code}); the soak compares the runtime with itself",
              file=sys.stderr)
    return art


def _holds(art: Path, n: int) -> bool:
    try:
        manifest = json.loads((art / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("mode") == "swappable" and len(manifest.get("adapters", [])) == n and \
        "validation" in manifest


def prepare_in_subprocess(base: str, n: int, work: Path) -> Path:
    """:func:`prepare` in a child process (PyTorch stays out of the measured process)."""
    art = work / f"{base}-{n}" / "art"
    if _holds(art, n):
        return art
    subprocess.run([sys.executable, __file__, "--prepare-only", "--base", base, "--adapters", str(n),
                    "--work", str(work)], check=True)
    return art


def adapter_files(art: Path) -> dict[str, Path]:
    manifest = json.loads((art / "manifest.json").read_text())
    return {a["name"]: art / a["file"] for a in manifest["adapters"]}


def artifact_runtime(art: Path) -> str:
    return json.loads((art / "manifest.json").read_text())["target"]["runtime"]


# -- the soak --------------------------------------------------------------------------------

def _probe(runtime_name: str, outputs: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """What an answer is compared on: all outputs (onnxruntime), or fixed vocabulary entries
    plus the top-1 index (llama.cpp)."""
    if cols is None:
        return np.asarray(outputs, np.float64).copy()
    row = np.asarray(outputs)[0]
    return np.concatenate([row[cols].astype(np.float64), [float(np.argmax(row))]])


def soak(art: Path, requests: int, workers: int, resident: int, max_seconds: float, cycle_sleep: float,
         threads: int = 1, contexts: int = 2, warmup: int | None = None, log=print) -> dict:
    """Serve ``requests`` requests while cycling every adapter of ``art`` through load/unload
    (see the module doc); returns the figures and the failures."""
    from loradeploy import runtime
    from loradeploy.errors import LoradeployError

    files = adapter_files(art)
    names = sorted(files)
    session = runtime.open(art, adapters=False, threads=threads, workers=contexts)
    rt = artifact_runtime(art)
    atol = next(b["atol"] for b in BASES.values() if b["runtime"] == rt)  # one session, one numerics
    texts = ONNX_TEXTS if rt == "onnxruntime" else LLAMA_TEXTS
    inputs = [session.encode([t]) for t in texts]
    cols = None
    if rt != "onnxruntime":  # fixed vocabulary entries, the same for every answer
        cols = np.sort(np.random.default_rng(0).choice(session.run(inputs[0]).outputs.shape[-1], LLAMA_PROBE,
                                                       replace=False))

    # expected answers, one adapter at a time, before any concurrency
    t0 = time.perf_counter()
    expected = {None: [_probe(rt, session.run(x).outputs, cols) for x in inputs]}
    fingerprint = {}
    for n in names:
        info = session.load_adapter(f"ref.{n}", files[n])
        fingerprint[n] = info.fingerprint
        expected[n] = [_probe(rt, session.run(x, f"ref.{n}").outputs, cols) for x in inputs]
        session.unload_adapter(f"ref.{n}")
    by_fp = {fp: n for n, fp in fingerprint.items()}
    if len(by_fp) != len(names):
        raise RuntimeError("two adapters share a fingerprint")
    keys = [None, *names]
    values = slice(None) if cols is None else slice(0, len(cols))  # not llama.cpp's top-1 index
    margin = min(max(float(np.abs(a[values] - b[values]).max()) for a, b in zip(expected[x], expected[y]))
                 for i, x in enumerate(keys) for y in keys[i + 1:])
    if margin <= 100 * atol:
        raise RuntimeError(f"two adapters answer within {margin:.2g} of each other: a swapped adapter could pass "
                           f"the {atol} check")
    log(f"{rt}: expected outputs of {len(names)} adapters + base on {len(inputs)} inputs in "
        f"{time.perf_counter() - t0:.1f} s (closest pair differs by {margin:.3g})")

    # state shared with the workers
    lock = threading.Lock()
    published: tuple[tuple[str, str], ...] = ()  # (session name, adapter) loaded now
    generations: dict[tuple[str, int], str] = {}
    counters = {"issued": 0, "served": 0, "direct": 0, "routed": 0, "base": 0, "gone": 0}
    wrong: list[tuple] = []
    errors: list[str] = []
    stop = threading.Event()

    router = runtime.ABRouter(session, {"a": files[names[0]], "b": files[names[1 % len(names)]]}, weights=[50, 50])
    generations[("a", 0)], generations[("b", 0)] = names[0], names[1 % len(names)]
    arm_gen = {"a": 0, "b": 0}

    answered: set[str | None] = set()

    def check(kind, want, result, i, extra=()):
        got = by_fp.get(result.fingerprint) if result.fingerprint else None
        if want not in answered:
            with lock:
                answered.add(want)
        if got != want or not np.allclose(_probe(rt, result.outputs, cols), expected[want][i], rtol=0, atol=atol):
            diff = float(np.abs(_probe(rt, result.outputs, cols) - expected[want][i]).max())
            with lock:
                wrong.append((kind, want, got, i, diff, *extra))

    def serve(w: int):
        rng = np.random.default_rng(1000 + w)
        while not stop.is_set():
            with lock:
                if counters["issued"] >= requests:
                    return
                k = counters["issued"]
                counters["issued"] += 1
            i = int(rng.integers(len(inputs)))
            try:
                if k % 16 == 1:
                    check("base", None, session.run(inputs[i]), i)
                    kind = "base"
                elif k % 4 == 0:
                    routed = router.run(f"user-{k % 1009}", inputs[i])
                    with lock:
                        want = generations.get((routed.arm, routed.generation))
                    check("routed", want, routed.result, i, (routed.arm, routed.generation))
                    kind = "routed"
                else:
                    for _attempt in range(100):
                        loaded = published
                        name, adapter = loaded[int(rng.integers(len(loaded)))]
                        try:
                            result = session.run(inputs[i], name)
                        except LoradeployError as e:  # unloaded between the pick and the call
                            if "is not loaded" not in str(e):
                                raise
                            with lock:
                                counters["gone"] += 1
                            continue
                        if result.adapter != name:
                            with lock:
                                wrong.append(("direct-name", adapter, result.adapter, i, 0.0))
                        check("direct", adapter, result, i)
                        break
                    else:
                        raise RuntimeError("100 picked adapters in a row were unloaded before the call")
                    kind = "direct"
            except Exception as e:  # noqa: BLE001 — every failure of a call is counted
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                    if len(errors) > 20:
                        stop.set()
                continue
            with lock:
                counters["served"] += 1
                counters[kind] += 1

    warmup = int(WARMUP_SHARE * requests) if warmup is None else warmup
    # fill the resident set before the workers start
    cycle, loads, unloads, arm_swaps = 0, 0, 0, 0
    live: deque[tuple[str, str]] = deque()

    def load_next():
        nonlocal cycle, loads, unloads, arm_swaps, published
        adapter = names[cycle % len(names)]
        name = f"{adapter}.{cycle}"
        session.load_adapter(name, files[adapter])
        loads += 1
        live.append((name, adapter))
        with lock:
            published = tuple(live)
        while len(live) > resident:
            old, _ = live.popleft()
            with lock:
                published = tuple(live)
            session.unload_adapter(old)
            unloads += 1
        if cycle >= resident:  # and one arm takes another adapter (the router loads and unloads it)
            arm = "ab"[cycle % 2]
            new = names[(cycle * 7 + 3) % len(names)]
            with lock:  # recorded before the new generation can serve anything
                generations[(arm, arm_gen[arm] + 1)] = new
            router.replace_arm(arm, files[new])
            arm_gen[arm] += 1
            arm_swaps += 1
        cycle += 1

    while len(live) < resident:
        load_next()
    threads_ = [threading.Thread(target=serve, args=(w,), daemon=True) for w in range(workers)]
    start = time.perf_counter()
    deadline = start + max_seconds
    for t in threads_:
        t.start()
    baseline = None  # (rss, fds, served) after warm-up
    samples: list[tuple[float, int, int]] = []  # (seconds, rss, fds) after warm-up
    last_sample, last_log = 0.0, start
    try:
        while any(t.is_alive() for t in threads_):
            now = time.perf_counter()
            if now > deadline:
                stop.set()
                break
            load_next()
            if now - last_sample >= 0.25:
                last_sample = now
                with lock:
                    served = counters["served"]
                if baseline is None and served >= warmup and cycle >= len(names) + resident:
                    gc.collect()
                    baseline = (rss_bytes(), fd_count(), served, now - start)
                elif baseline is not None:
                    samples.append((now - start, rss_bytes(), fd_count()))
            if now - last_log >= 30:
                last_log = now
                log(f"{rt}: {counters['served']:,} served, {cycle:,} loads, {arm_swaps:,} arm swaps, "
                    f"RSS {rss_bytes() / 2**20:.1f} MB, fds {fd_count()}, {len(wrong)} wrong")
            time.sleep(cycle_sleep)
    finally:
        stop.set()
        for t in threads_:
            t.join(timeout=60)
    seconds = time.perf_counter() - start
    gc.collect()
    end_rss, end_fds = rss_bytes(), fd_count()
    snap = router.snapshot()
    distinct = len(answered - {None})
    session.close()
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    record = {
        "runtime": rt, "artifact": str(art), "adapters": len(names), "distinct_answered": distinct,
        "resident": resident, "workers": workers, "contexts": contexts if rt == "llama.cpp" else None,
        "requests_asked": requests, "requests": counters["served"], "seconds": seconds,
        "per_second": counters["served"] / seconds if seconds else None,
        "direct": counters["direct"], "routed": counters["routed"], "base_alone": counters["base"],
        "picked_then_unloaded": counters["gone"],
        "loads": loads, "unloads": unloads, "arm_swaps": arm_swaps, "cycles_over_all": cycle / len(names),
        "wrong": len(wrong), "wrong_examples": [list(map(str, w)) for w in wrong[:5]],
        "errors": len(errors), "error_examples": errors[:5],
        "router_requests": snap["requests"], "router_errors": sum(a["errors"] for a in snap["arms"].values()),
        "warmup_requests": baseline[2] if baseline else None, "warmup_seconds": baseline[3] if baseline else None,
        "rss_baseline_mb": baseline[0] / 2**20 if baseline else None,
        "rss_max_mb": max(rss) / 2**20 if rss else None, "rss_min_mb": min(rss) / 2**20 if rss else None,
        "rss_end_mb": end_rss / 2**20,
        "rss_drift": (max(rss) / baseline[0] - 1) if rss and baseline else None,
        "fd_before": baseline[1] if baseline else None, "fd_after": end_fds,
        "fd_min": min(fds) if fds else None, "fd_max": max(fds) if fds else None, "samples": len(samples),
        "rss_curve_mb": [(round(t), round(b / 2**20, 1)) for t, b, _ in samples[::max(1, len(samples) // 20)]],
    }
    record["goals"] = goals(record)
    return record


def goals(r: dict) -> dict[str, bool]:
    return {
        "requests": r["requests"] >= r["requests_asked"],
        "0 wrong": r["wrong"] == 0 and r["errors"] == 0 and r["router_errors"] == 0,
        "RSS ≤ +2%": r["rss_drift"] is not None and r["rss_drift"] <= RSS_DRIFT_MAX and r["samples"] >= 5,
        "fd flat": r["fd_before"] is not None and r["fd_min"] == r["fd_max"] == r["fd_before"] == r["fd_after"],
    }


def table(records: list[dict]) -> str:
    head = (f"{'runtime':<12} {'requests':>9} {'req/s':>7} {'loads':>6} {'unloads':>7} {'arm swaps':>9} "
            f"{'wrong':>5} {'errors':>6} {'RSS base':>9} {'RSS max':>9} {'drift':>7} {'fd before/after':>15} "
            f"{'goals':>6}")
    lines = [head, "-" * len(head)]
    for r in records:
        ok = all(r["goals"].values())
        drift = f"{r['rss_drift']:+.2%}" if r["rss_drift"] is not None else "-"
        base = f"{r['rss_baseline_mb']:.1f}MB" if r["rss_baseline_mb"] else "-"
        top = f"{r['rss_max_mb']:.1f}MB" if r["rss_max_mb"] else "-"
        lines.append(f"{r['runtime']:<12} {r['requests']:>9,} {r['per_second']:>7.0f} {r['loads']:>6,} "
                     f"{r['unloads']:>7,} {r['arm_swaps']:>9,} {r['wrong']:>5} {r['errors']:>6} {base:>9} {top:>9} "
                     f"{drift:>7} {str(r['fd_before']) + '/' + str(r['fd_after']):>15} {'ok' if ok else 'FAIL':>6}")
    for r in records:
        failed = [g for g, ok in r["goals"].items() if not ok]
        lines.append(f"{r['runtime']}: {r['adapters']} adapters cycled ({r['cycles_over_all']:.1f} times each; "
                     f"{r['distinct_answered']} answered requests), "
                     f"{r['resident']} resident + 2 router arms, {r['workers']} worker threads"
                     + (f" on {r['contexts']} contexts" if r["contexts"] else "")
                     + f"; {r['direct']:,} direct / {r['routed']:,} routed / {r['base_alone']:,} base-alone; "
                     f"{r['picked_then_unloaded']:,} picks unloaded before the call (retried); warm-up "
                     f"{r['warmup_requests'] or 0:,} requests; {r['seconds']:.0f} s; fd range during "
                     f"{r['fd_min']}..{r['fd_max']} over {r['samples']} samples"
                     + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        for w in r["wrong_examples"]:
            lines.append(f"  wrong: {w}")
        for e in r["error_examples"]:
            lines.append(f"  error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="minilm,gemma3-270m", help="comma-separated: minilm, gemma3-270m")
    ap.add_argument("--requests", type=int, default=100_000, help="per base")
    ap.add_argument("--adapters", type=int, default=50, help="distinct adapters cycled")
    ap.add_argument("--resident", type=int, default=8, help="adapters loaded at a time (besides the 2 arms)")
    ap.add_argument("--workers", type=int, help="request threads (default: 4 onnxruntime, 3 llama.cpp)")
    ap.add_argument("--contexts", type=int, default=2, help="llama.cpp contexts (session workers)")
    ap.add_argument("--cycle-ms", type=float, default=20.0, help="pause between two load/unload cycles")
    ap.add_argument("--onnx", type=Path, help="a swappable MiniLM onnx-cpu artifact to use (else exported)")
    ap.add_argument("--gguf", type=Path, help="a swappable Gemma gguf-cpu artifact to use (else exported)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where derived adapters and artifacts are kept")
    ap.add_argument("--max-seconds", type=float, default=1800, help="per base; a soak cut short fails")
    ap.add_argument("--warmup", type=int, help="requests served before the RSS/fd baseline (default: 10%%; "
                    "llama.cpp with default glibc malloc: each thread's arena keeps growing for ~3,000 requests)")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bases = args.base.split(",")
    if unknown := [b for b in bases if b not in BASES]:
        ap.error(f"unknown base {', '.join(unknown)} (known: {', '.join(BASES)})")
    if args.prepare_only:
        for base in bases:
            prepare(base, args.adapters, args.work)
        return 0
    records = []
    for base in bases:
        given = args.onnx if base == "minilm" else args.gguf
        t0 = time.perf_counter()
        art = given or prepare_in_subprocess(base, args.adapters, args.work)
        print(f"{base}: artifact {art} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        workers = args.workers or (4 if BASES[base]["runtime"] == "onnxruntime" else 3)
        records.append(soak(art, args.requests, workers, args.resident, args.max_seconds, args.cycle_ms / 1e3,
                            contexts=args.contexts, warmup=args.warmup, log=lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(records, indent=2) if args.json else table(records))
    return 0 if all(all(r["goals"].values()) for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
