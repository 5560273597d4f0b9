"""ExecuTorch target, ratios measured side by side in one run (MiniLM classifier, sora and increlora).

    python benchmarks/executorch_cpu.py [--artifacts DIR] [--rounds 20] [--threads 1] [--loaded 32] [--json]

Four artifacts (exported into ``--artifacts`` unless already there): the executorch profile's
swappable program (sora + increlora), its merged program (sora folded in), executorch-int8's
swappable program (torchao dynamic int8, sora + increlora) and onnx-cpu's swappable graph (sora +
increlora). At batch 1 × seq 128, the same token ids, the same threads,
each through its loradeploy session (``run``), rounds interleaved so all see the same load:
  - ExecuTorch XNNPACK fp32, sora on, against onnxruntime fp32, sora on;
  - the swappable program, sora on, against the merged program;
  - the int8 swappable program, sora on, against the fp32 one (and its label agreement with the
    fp32 PyTorch reference, from its export's validation);
  - loading an adapter into the open session (read its .ptd, check, pad) against reloading the
    program (``Runtime.load_program`` + ``load_method``); beside it, reading the .ptd alone with
    loradeploy's reader and with executorch's own deserializer (``flatc`` in a subprocess);
  - each adapter's .ptd bytes against its .onnx_adapter bytes, and the bytes its tensors take
    once loaded against its .ptd;
  - the process's RSS growth per loaded adapter against its .ptd bytes, with ``--loaded`` (32)
    adapters loaded (sora's and increlora's files under as many names, alternating), in a fresh
    process: the swappable artifact opened with no adapter, one run on the base, one spare
    adapter loaded, run and unloaded (one-time costs), ``gc.collect()``, VmRSS; then the adapters
    loaded, each run once, ``gc.collect()``, VmRSS again (as ``benchmarks/adapter_memory.py``);
  - the swappable program, sora on, against sora and increlora alternating call by call (each
    slot's rank axis changes shape with the adapter);
  - fidelity from each export's own validation (label agreement, max |Δlogit| vs PyTorch).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTERS = ("sora", "increlora")
SEQ = 128


def export_all(out: Path, eval_texts: int) -> dict[str, Path]:
    """The four artifacts in ``out`` (each exported unless its manifest is there)."""
    from loradeploy.evaldata import DEFAULT_EVAL
    from loradeploy.job import AdapterSpec
    from tests.support.exports import export_adapters
    from tests.support.profiles import quick_profile

    out.mkdir(parents=True, exist_ok=True)
    ev = out / "eval.jsonl"
    ev.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:eval_texts]) + "\n")
    timing = dict(warmup=1, runs=3, shapes=[{"batch": 1, "seq": SEQ}])
    plan = {"et-swappable": ("executorch", "swappable", ADAPTERS), "et-merged": ("executorch", "merged", ADAPTERS[:1]),
            "et-int8": ("executorch-int8", "swappable", ADAPTERS), "ort-swappable": ("onnx-cpu", "swappable", ADAPTERS)}
    folders = {}
    for key, (target, mode, adapters) in plan.items():
        folders[key] = out / key
        if not (folders[key] / "manifest.json").is_file():
            profile = quick_profile(out, target, **timing)
            specs = [AdapterSpec(n, REPO / "examples" / "adapters" / n) for n in adapters]
            export_adapters("minilm", specs, profile, folders[key], mode=mode, eval_path=ev, overwrite=True)
    return folders


def _timer(session, inputs, adapter):
    def call() -> float:
        t0 = time.perf_counter()
        session.run(inputs, adapter)
        return (time.perf_counter() - t0) * 1e3
    return call


def _ms(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def _alternating(session, inputs):
    names = iter(ADAPTERS * 10_000)

    def call() -> float:
        t0 = time.perf_counter()
        session.run(inputs, next(names))
        return (time.perf_counter() - t0) * 1e3
    return call


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def loaded_rss(folder: Path, n: int) -> dict:
    """In this process: the RSS ``n`` loaded adapters add, each having served one request."""
    from loradeploy import runtime

    files = [folder / "adapters" / f"{ADAPTERS[i % len(ADAPTERS)]}.ptd" for i in range(n)]
    session = runtime.open(folder, adapters=False, threads=1)
    request = session.encode(["The staff were lovely and the room was clean."])
    session.run(request)
    session.load_adapter("spare", files[0])
    session.run(request, "spare")
    session.unload_adapter("spare")
    gc.collect()
    baseline = rss_bytes()
    for i, path in enumerate(files):
        session.load_adapter(f"copy{i}", path)
    for i in range(n):
        session.run(request, f"copy{i}")
    gc.collect()
    added = rss_bytes() - baseline
    file_bytes = sum(p.stat().st_size for p in files)
    session.close()
    return {"loaded": n, "file_bytes": file_bytes, "rss_added": added, "rss_over_file_bytes": added / file_bytes}


def loaded_rss_in_child(folder: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), str(n)], capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(folders: dict[str, Path], rounds: int, threads: int, per_round: int = 3) -> dict:
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    from loradeploy import runtime
    from loradeploy.plugins.executorch.session import load_method
    from loradeploy.plugins.executorch.tensor_data import read_tensor_data

    ids = np.random.default_rng(0).integers(1000, 2000, size=(1, SEQ), dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    adapter = ADAPTERS[0]
    with runtime.open(folders["et-swappable"], threads=threads) as et, \
            runtime.open(folders["et-merged"], threads=threads) as merged, \
            runtime.open(folders["et-int8"], threads=threads) as int8, \
            runtime.open(folders["ort-swappable"], threads=threads) as ort:
        outs = {"et": et.run(inputs, adapter).outputs, "merged": merged.run(inputs).outputs,
                "ort": ort.run(inputs, adapter).outputs}
        calls = {"et": _timer(et, inputs, adapter), "merged": _timer(merged, inputs, None),
                 "int8": _timer(int8, inputs, adapter), "ort": _timer(ort, inputs, adapter),
                 "et_alternating": _alternating(et, inputs)}
        for call in calls.values():
            [call() for _ in range(2)]
        times = {k: [] for k in calls}
        for _ in range(rounds):
            for key, call in calls.items():
                times[key] += [call() for _ in range(per_round)]
        et_base = [_timer(et, inputs, None)() for _ in range(per_round * 3)]
        held = {}  # bytes an adapter's own input tensors take, beside the base's shared ones
        for name in ADAPTERS:
            with et.holding(name) as rec:
                held[name] = sum(t.nbytes for t, b in zip(rec.handle, et._base_inputs) if t is not b)
        loads, reloads, reads, et_reads = [], [], [], []
        path = folders["et-swappable"] / "adapters" / f"{ADAPTERS[1]}.ptd"
        for i in range(max(5, rounds // 2)):
            t0 = time.perf_counter()
            et.load_adapter(f"again{i}", path)
            loads.append((time.perf_counter() - t0) * 1e3)
            et.unload_adapter(f"again{i}")
            t0 = time.perf_counter()
            program, method = load_method(folders["et-swappable"] / "model.pte")
            reloads.append((time.perf_counter() - t0) * 1e3)
            del program, method
            reads.append(_ms(read_tensor_data, path))
            et_reads.append(_ms(lambda p: FlatTensorSerializer().deserialize(Cord(p.read_bytes())), path))
    p50 = statistics.median
    sizes = {a: {"ptd_bytes": (folders["et-swappable"] / "adapters" / f"{a}.ptd").stat().st_size,
                 "onnx_adapter_bytes": (folders["ort-swappable"] / "adapters" / f"{a}.onnx_adapter").stat().st_size}
             for a in ADAPTERS}
    fidelity = {}
    for key in ("et-swappable", "et-merged", "et-int8"):
        metrics = json.loads((folders[key] / "manifest.json").read_text())["validation"]["metrics"]
        fidelity[key] = {a: {k: metrics[a][k] for k in ("label_agreement", "max_abs_logit")} for a in metrics
                         if isinstance(metrics[a], dict) and "max_abs_logit" in metrics[a]}
    return {
        "shape": f"b1xs{SEQ}", "threads": threads, "rounds": rounds, "calls_per_round": per_round,
        "et_swappable_p50_ms": p50(times["et"]), "et_merged_p50_ms": p50(times["merged"]),
        "ort_swappable_p50_ms": p50(times["ort"]), "et_no_adapter_p50_ms": p50(et_base),
        "et_alternating_p50_ms": p50(times["et_alternating"]),
        "alternating_over_one_adapter_p50": p50(times["et_alternating"]) / p50(times["et"]),
        "et_over_ort_p50": p50(times["et"]) / p50(times["ort"]), "et_over_ort_min": min(times["et"]) / min(times["ort"]),
        "swappable_over_merged_p50": p50(times["et"]) / p50(times["merged"]),
        "swappable_over_merged_min": min(times["et"]) / min(times["merged"]),
        "et_int8_p50_ms": p50(times["int8"]), "fp32_over_int8_p50": p50(times["et"]) / p50(times["int8"]),
        "fp32_over_int8_min": min(times["et"]) / min(times["int8"]),
        "adapter_load_p50_ms": p50(loads), "program_reload_p50_ms": p50(reloads),
        "reload_over_adapter_load": p50(reloads) / p50(loads), "reload_over_adapter_load_min": min(reloads) / min(loads),
        "ptd_read_p50_ms": p50(reads), "ptd_executorch_deserialize_p50_ms": p50(et_reads),
        "ptd_over_onnx_adapter_bytes": {a: s["ptd_bytes"] / s["onnx_adapter_bytes"] for a, s in sizes.items()},
        "adapter_bytes": sizes, "fidelity": fidelity,
        "held_over_ptd_bytes": {a: held[a] / sizes[a]["ptd_bytes"] for a in ADAPTERS},
        "et_vs_ort_max_abs": float(np.abs(outs["et"] - outs["ort"]).max()),
        "et_swappable_vs_merged_max_abs": float(np.abs(outs["et"] - outs["merged"]).max()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, help="folder holding (or to hold) the four exported artifacts")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-texts", type=int, default=100, help="eval texts the exports validate on")
    ap.add_argument("--loaded", type=int, default=32, help="adapters loaded for the RSS measure")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rss-child", nargs=2, metavar=("ARTIFACT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        print(json.dumps(loaded_rss(Path(args.rss_child[0]), int(args.rss_child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folders = export_all(args.artifacts or Path(tmp), args.eval_texts)
        result = measure(folders, args.rounds, args.threads)
        result["rss"] = loaded_rss_in_child(folders["et-swappable"], args.loaded)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:32} {value:.4g}" if isinstance(value, float) else f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
