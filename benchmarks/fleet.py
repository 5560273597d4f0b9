"""Fleet export vs separate ``export`` runs, measured side by side in one run:

    python benchmarks/fleet.py [--adapters 24] [--separate N] [--workers W] [--no-ray] [--json]

24 adapters are derived from the three MiniLM examples (each read, pruned exactly and written as a
PEFT folder with its lora_B scaled by 0.6, 0.7, … 1.3: distinct files, distinct outputs) and
exported to onnx-cpu, swappable, with the built-in profile (its full timing runs):

* separate: one ``loradeploy export`` process per adapter (``--separate N`` times the first N and
  scales to all, said so in the table);
* fleet of 1 and fleet of all, cold, into new folders: the marginal time per extra adapter is
  (T_all − T_1) / (n − 1), held against one separate export;
* a re-run after changing one adapter's file, twice: in a fresh process (what a CI job pays), and
  handed to a resident worker (``fleet serve``, started once, after it ran a 1-adapter fleet as any
  earlier run leaves it): the units that ran, and the time against the marginal;
* peak RSS summed over the process tree (sampled every 50 ms), fleet vs one separate export;
* the same spec on a local Ray cluster: the same index (keys and sha256 per file) as the pool.

Goals (issue 19): fleet ≥ 4× faster than separate runs; marginal ≤ 15% of one export; the
re-run redoes one unit in ≤ 2× the marginal; RSS ≤ 1.5×; Ray's index = the pool's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADAPTERS = REPO / "examples" / "adapters"
EXAMPLES = {"sora": ADAPTERS / "sora" / "head.safetensors", "increlora": None, "blora": None}
CLI = [sys.executable, "-m", "loradeploy.cli"]
START_IMPORTS = ("import loradeploy.cli, loradeploy.export, loradeploy.validate, onnxruntime, peft.utils.other; "
                 "from transformers import BertModel")


def derive(folder: Path, count: int, bump: float = 0.0) -> dict[str, Path]:
    """``count`` PEFT adapters from the examples, round-robin, lora_B scaled per copy."""
    from loradeploy.adapters import ReadOptions, read_adapter
    from loradeploy.adapters import peft as peft_format
    from loradeploy.prune import prune

    read = {n: prune(read_adapter(ADAPTERS / n, None, ReadOptions(head=h)))[0] for n, h in EXAMPLES.items()}
    out = {}
    for k in range(count):
        name = list(EXAMPLES)[k % len(EXAMPLES)]
        factor = 0.6 + 0.1 * (k // len(EXAMPLES)) + bump
        adapters = read[name]
        modules = {m: replace(mod, lora_B=mod.lora_B * factor) for m, mod in adapters.modules.items()}
        dst = folder / f"{name}-{k // len(EXAMPLES)}"
        dst.mkdir(parents=True, exist_ok=True)
        peft_format.write(replace(adapters, modules=modules), dst)
        out[dst.name] = dst
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it (parent ids read from /proc)."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [c for c, par in parents.items() if par in frontier]
        tree += frontier
    return tree


class TreeRSS:
    """Peak of the RSS summed over a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(p) for p in process_tree(self.pid)))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], ok=(0,)) -> tuple[float, int]:
    """Wall seconds and peak tree RSS (bytes) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss = TreeRSS(proc.pid)
    _, err = proc.communicate()
    peak = rss.stop()
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0, peak


def spec_file(folder: Path, adapters: dict[str, Path], name: str) -> Path:
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump({"version": 1, "base": "minilm", "mode": "swappable", "targets": ["onnx-cpu"],
                                    "adapters": [{"name": n, "path": str(p)} for n, p in adapters.items()]}))
    return path


def index_files(out: Path) -> dict:
    index = json.loads((out / "index.json").read_text())
    return {u["id"]: (u["key"], u["files"]) for u in index["units"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=24)
    ap.add_argument("--separate", type=int, help="time this many separate exports and scale (default: all)")
    ap.add_argument("--workers", type=int, help="fleet pool size (default: the CPU count)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.adapters
    work = Path(tempfile.mkdtemp(prefix="loradeploy-fleet-bench-"))
    os.environ["LORADEPLOY_FLEET_SOCKET"] = str(work / "worker.sock")  # no worker but the one started below
    adapters = derive(work / "adapters", n)
    workers = ["--workers", str(args.workers)] if args.workers else []
    rows = {}

    sep_n = min(args.separate or n, n)
    sep_times, sep_rss = [], []
    for name, path in list(adapters.items())[:sep_n]:
        t, rss = timed([*CLI, "export", "--base", "minilm", "--adapter", f"{name}={path}", "--target", "onnx-cpu",
                        "--mode", "swappable", "-o", str(work / "separate" / name)])
        sep_times.append(t)
        sep_rss.append(rss)
    single = sum(sep_times) / len(sep_times)
    separate_total = single * n if sep_n < n else sum(sep_times)

    first = dict(list(adapters.items())[:1])
    one = spec_file(work, first, "one.yaml")
    t1, _ = timed([*CLI, "fleet", "run", str(one), "-o", str(work / "fleet1"), "--in-process", *workers])
    spec = spec_file(work, adapters, "all.yaml")
    t_all, rss_all = timed([*CLI, "fleet", "run", str(spec), "-o", str(work / "fleet"), "--in-process", *workers])
    marginal = (t_all - t1) / (n - 1)

    def change(k: int) -> str:
        """Adapter ``k``'s files replaced by a copy with another lora_B scale; its name."""
        name = list(adapters)[k]
        derive(work / f"changed-{k}", k + 1, bump=0.05)
        for f in (work / f"changed-{k}" / name).iterdir():
            (adapters[name] / f.name).write_bytes(f.read_bytes())
        return name

    def ran() -> list[str]:
        return sorted(u["id"] for u in json.loads((work / "fleet" / "index.json").read_text())["units"] if u["ran"])

    change(0)
    t_re, _ = timed([*CLI, "fleet", "run", str(spec), "-o", str(work / "fleet"), "--in-process", *workers])
    ran_fresh = ran()
    # a resident worker, started once; as after any earlier run it holds the base (here: a
    # 1-adapter fleet into a scratch folder)
    t_serve, _ = timed([*CLI, "fleet", "serve", "--detach", "--idle-timeout", "600"])
    try:
        timed([*CLI, "fleet", "run", str(one), "-o", str(work / "warm"), *workers])
        change(1)
        t_resident, _ = timed([*CLI, "fleet", "run", str(spec), "-o", str(work / "fleet"), *workers])
        ran_resident = ran()
        from loradeploy.fleet.server import ping

        pid = (ping() or {}).get("pid")
        in_worker = all(json.loads((work / "fleet" / f"{u}.unit.json").read_text())["worker"].endswith(f":{pid}")
                        for u in ran_resident)
    finally:
        subprocess.run([*CLI, "fleet", "stop"], capture_output=True)
    # what any fresh process running one unit pays first: the interpreter and the imports a unit
    # needs (loradeploy's CLI, transformers' BERT, onnxruntime, PEFT), timed the same way
    t_start, _ = timed([sys.executable, "-c", START_IMPORTS])

    rows = {"separate exports, total s": (separate_total, f"{sep_n} timed" + ("" if sep_n == n else f", scaled to {n}")),
            "one export, mean s": (single, ""), "fleet of 1, s": (t1, ""), f"fleet of {n}, s": (t_all, ""),
            "fleet speed-up vs separate": (separate_total / t_all, "goal >= 4"),
            "marginal s per extra adapter": (marginal, ""),
            "marginal / one export": (marginal / single, "goal <= 0.15"),
            "re-run after one change, fresh process, s": (t_re, f"ran: {', '.join(ran_fresh)}"),
            "  / marginal": (t_re / marginal, "a new process's start is in it"),
            "process start + a unit's imports, s": (t_start, "part of any re-run in a fresh process"),
            "resident worker start (fleet serve --detach), s": (t_serve, "once"),
            "re-run after one change, resident worker, s": (t_resident, f"ran: {', '.join(ran_resident)}, "
                                                                          f"in the worker: {'yes' if in_worker else 'NO'}"),
            "re-run in the resident worker / marginal": (t_resident / marginal, "goal <= 2 (and only that unit)"),
            "peak RSS fleet / one export": (rss_all / max(sep_rss), f"{rss_all / 2**20:.0f} MB / {max(sep_rss) / 2**20:.0f} MB; goal <= 1.5")}
    if not args.no_ray:
        # the pool's output after the change is the reference; Ray runs the same spec cold
        t_ray, _ = timed([*CLI, "fleet", "run", str(spec), "-o", str(work / "ray"), "--executor", "ray", *workers])
        same = index_files(work / "ray") == index_files(work / "fleet")
        rows["Ray (local cluster), s"] = (t_ray, "same index (keys, sha256 per file) as the pool: "
                                                 + ("yes" if same else "NO"))
    if args.json:
        print(json.dumps({k: {"value": v, "note": note} for k, (v, note) in rows.items()}, indent=2))
    else:
        width = max(map(len, rows))
        print(f"fleet benchmark: {n} adapters × onnx-cpu (swappable), {os.cpu_count()} cores, work folder {work}")
        for k, (v, note) in rows.items():
            print(f"  {k:<{width}}  {v:10.3f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
