"""``loradeploy fleet``: run, serve, stop and merge (many adapters × targets from one spec)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .options import emit, socket_option


@click.group("fleet")
def fleet_group():
    """Many adapters × targets from one spec: each (adapter, target) a unit keyed by the sha256
    of its inputs, skipped when its artifact is up to date; the base's graph built once per
    target; a local process pool by default, shards for CI matrices, Ray for clusters.

    Spec (YAML): base, adapters (paths and globs), targets, and optionally mode, plan, eval,
    slots, resources. See `loradeploy fleet run --help` and examples/fleet.yaml."""



@fleet_group.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Fleet output folder (TARGET/ADAPTER artifacts, index.json, index.html, junit.xml); a re-run "
                   "into it redoes only the units whose inputs changed.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine. ray: Ray tasks on a local cluster, or on RAY_ADDRESS "
                   "(needs loradeploy[ray]).")
@click.option("--workers", type=click.IntRange(min=1),
              help="local: pool processes (default: as many as the units' runtime threads fill the cores — one "
                   "for profiles with threads 0, which take every core; 1 runs in this process). ray: CPUs of "
                   "the local cluster it starts.")
@click.option("--shard", metavar="I/N", help="Run only shard I of N (a fixed partition by unit id; merge the N "
                                             "outputs with `loradeploy fleet merge`).")
@click.option("--force", is_flag=True, help="Run every unit, even those up to date.")
@click.option("--in-process", is_flag=True,
              help="Run here even when a resident worker (`loradeploy fleet serve`) answers on the socket.")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def fleet_run_cmd(spec, out, executor, workers, shard, force, in_process, socket_file, as_json):
    """Export every unit of SPEC into OUT and write its index.

    With the local executor the run goes to the resident worker when one answers for this
    toolchain (see `loradeploy fleet serve`): the same units, keys and files, without a new
    process's imports and base load. Exit 0 when every unit passes, 1 when any is outside its
    budget or failed (the others still run), 2 for a bad spec."""
    from ..fleet import FleetConfig, run_fleet
    from ..render import fleet_progress, print_fleet

    config = FleetConfig(Path(spec), Path(out), executor, workers, shard, force)
    with fleet_progress() as progress:
        resident = None
        if executor == "local" and not in_process:
            from ..fleet.server import Refused, run_resident

            try:
                resident = run_resident(config, progress, Path(socket_file) if socket_file else None)
            except Refused as e:
                progress("note", f"{e}; running in this process")
        index = resident[0] if resident else run_fleet(config, progress)
    if resident:
        index["fleet"]["resident_worker"] = {"pid": resident[1]}
    index["fleet"]["out"] = str(Path(out).absolute())
    emit(index, as_json, print_fleet)
    return 0 if index["passed"] else 1


@fleet_group.command("serve")
@socket_option
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=1800, show_default=True,
              help="End after this many seconds without a run.")
@click.option("--detach", is_flag=True, help="Start in the background and return once it answers.")
def fleet_serve_cmd(socket_file, idle_timeout, detach):
    """Keep a resident fleet worker: one process with PyTorch, transformers and PEFT imported (a
    runtime's own package from its first run on), which later `fleet run`s of this toolchain hand
    their run to. It keeps the bases it loaded and its pool processes between runs, so a re-run
    after one adapter changed costs about that unit alone. One run at a time; others wait. Stop
    it with `loradeploy fleet stop`."""
    from ..fleet.server import ResidentWorker, socket_path, start_detached

    path = Path(socket_file) if socket_file else socket_path()
    if detach:
        pid = start_detached(path, idle_timeout)
        click.echo(f"resident fleet worker pid {pid} on {path} (log: {path}.log)")
        return
    ResidentWorker(path, idle_timeout, log=lambda m: click.echo(f"[{time.strftime('%H:%M:%S')}] {m}", err=True)).serve()


@fleet_group.command("stop")
@socket_option
def fleet_stop_cmd(socket_file):
    """Stop the resident fleet worker (after the run it is busy with). Exit 1 when none answers."""
    from ..fleet.server import socket_path, stop

    path = Path(socket_file) if socket_file else socket_path()
    pid = stop(path)
    if pid is None:
        click.echo(f"no resident fleet worker answers on {path}", err=True)
        return 1
    click.echo(f"stopped the resident fleet worker pid {pid}")
    return 0


@fleet_group.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Merged fleet output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def fleet_merge_cmd(shards, out, as_json):
    """Merge the outputs of `fleet run --shard I/N` (all N, one spec) into one fleet output with
    one index. Exit 1 when any unit failed, 2 when the shards do not make one whole run."""
    from ..fleet import merge_shards
    from ..render import print_fleet

    index = merge_shards([Path(s) for s in shards], Path(out))
    index["fleet"]["out"] = str(Path(out).absolute())
    emit(index, as_json, print_fleet)
    return 0 if index["passed"] else 1
