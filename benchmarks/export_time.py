"""A fresh ``loradeploy export`` end to end, stage by stage, against one unit of a warm fleet:

    python benchmarks/export_time.py [--runs 3] [--target onnx-cpu] [--eval FILE] [--json]

* export: ``loradeploy export --base minilm --adapter examples/adapters/sora --target T`` in a new
  process each run (what a user or a CI job pays): wall seconds from the start of the process, the
  CPU seconds of its process tree (the latency process included), and each stage's seconds from
  the timestamped lines it prints on a piped stderr (``start-up``: before the first line);
* fleet unit: the same adapter twice (two names) in ``fleet run --in-process``: the second unit's
  seconds are an export in a warm worker (imports done, base loaded, base-alone outputs and, for
  the same graph and tensor shapes, the latency record reused);
* export / fleet unit: the ratio of medians, measured in one run so that both see the same load
  (this machine's 2 cores are shared: the load average before and after each export is shown).

Goal (issue 34): MiniLM ``export --target onnx-cpu`` in ≤ 20 s end to end on this machine class.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "examples" / "adapters" / "sora"
CLI = [sys.executable, "-m", "loradeploy.cli"]
#: a stage's end as ``progress_steps`` prints it on a pipe: ``[12:00:00 +  8.3s] done: WHAT (7.7 s)``
DONE = re.compile(r"^\[\d\d:\d\d:\d\d \+ *[\d.]+s\] done: (?P<what>.*) \((?P<seconds>[\d.]+) s\)$")
#: stage names by how their line begins (the rest names the adapter, task or file)
STAGES = (("read and pruned", "read adapters"), ("loaded base", "load base"), ("eval set", "eval set"),
          ("exported", "export graph"), ("computed fp32 reference", "fp32 reference"), ("fidelity", "fidelity"),
          ("validated", "latency"))


def stage_seconds(lines: list[str]) -> dict[str, float]:
    """Seconds per stage from an export's stderr lines (a stage seen twice is summed)."""
    out: dict[str, float] = {}
    for line in lines:
        m = DONE.match(line)
        if m:
            name = next((n for prefix, n in STAGES if m["what"].startswith(prefix)), m["what"])
            out[name] = out.get(name, 0.0) + float(m["seconds"])
    return out


def run_export(target: str, out: Path, eval_path: Path | None) -> dict:
    """One export in a new process: wall and CPU seconds, start-up and per-stage seconds."""
    argv = [*CLI, "export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", target, "-o", str(out),
            "--overwrite", "--json"] + (["--eval", str(eval_path)] if eval_path else [])
    load_before = os.getloadavg()[0]
    cpu0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, lines = None, []
    for line in proc.stderr:
        first = first if first is not None else time.perf_counter() - t0
        lines.append(line.rstrip("\n"))
    stdout = proc.stdout.read()
    if proc.wait() not in (0, 1):  # 1: outside a budget, still a whole export
        raise SystemExit(f"export failed ({proc.returncode}): {lines[-1:]}")
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    json.loads(stdout)  # the manifest: the export finished
    return {"wall_s": wall, "cpu_s": (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system),
            "stages_s": {"start-up": first or 0.0, **stage_seconds(lines)},
            "load_average": [load_before, os.getloadavg()[0]]}


def fleet_unit(target: str, work: Path, eval_path: Path | None) -> float:
    """Seconds of the warm (second) unit of a 2-unit in-process fleet of the adapter."""
    import yaml

    spec = work / "fleet.yaml"
    data = {"version": 1, "base": "minilm", "targets": [target],
            "adapters": [{"name": n, "path": str(ADAPTER)} for n in ("first", "second")]}
    if eval_path:
        data["eval"] = str(eval_path)
    spec.write_text(yaml.safe_dump(data))
    env = {**os.environ, "LORADEPLOY_FLEET_SOCKET": str(work / "no-worker.sock")}
    done = subprocess.run([*CLI, "fleet", "run", str(spec), "-o", str(work / "fleet"), "--in-process", "--workers", "1",
                           "--json"], capture_output=True, text=True, env=env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"fleet run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    seconds = {u["adapter"]: u["seconds"] for u in json.loads(done.stdout)["units"]}
    return seconds["second"]


def measure(runs: int, target: str, eval_path: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="loradeploy-export-time-"))
    try:
        exports = [run_export(target, work / "out", eval_path) for _ in range(runs)]
        unit = fleet_unit(target, work, eval_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~180 MB of artifacts
    median = {k: statistics.median(e[k] for e in exports) for k in ("wall_s", "cpu_s")}
    stages = {s: statistics.median(e["stages_s"].get(s, 0.0) for e in exports) for s in exports[0]["stages_s"]}
    return {"target": target, "runs": runs, "cores": os.cpu_count(), "export_s": median["wall_s"],
            "export_cpu_s": median["cpu_s"], "stages_s": stages, "fleet_unit_s": unit,
            "export_over_fleet_unit": median["wall_s"] / unit, "goal_s": 20.0,
            "exports": exports}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh exports to time (the median is reported)")
    ap.add_argument("--target", default="onnx-cpu")
    ap.add_argument("--eval", type=Path, help="eval set (default: the shipped 500 texts)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.runs, args.target, args.eval)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"export time: minilm + sora → {r['target']}, {r['cores']} cores, median of {r['runs']} fresh exports")
    print(f"  export end to end, s          {r['export_s']:8.1f}  goal <= {r['goal_s']:.0f}")
    for stage, s in r["stages_s"].items():
        print(f"    {stage:<28} {s:8.1f}")
    print(f"  export CPU s (process tree)   {r['export_cpu_s']:8.1f}")
    print(f"  fleet unit (warm worker), s   {r['fleet_unit_s']:8.1f}")
    print(f"  export / fleet unit           {r['export_over_fleet_unit']:8.2f}")
    loads = ", ".join(f"{a:.1f}→{b:.1f}" for a, b in (e["load_average"] for e in r["exports"]))
    print(f"  load average per export (1 min): {loads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
