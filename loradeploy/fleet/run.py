"""The ``fleet`` verbs: run a spec's units (skipping those already up to date in the output),
and merge the outputs of shards into one index.

Layout of a fleet output ``OUT``::

    OUT/TARGET/ADAPTER/            one artifact per unit (verify, check, validate, ab take it)
    OUT/TARGET/ADAPTER.unit.json   the unit's key and result (written after the artifact)
    OUT/_shared/PROFILE/KEY/       a base graph shared by the target's swappable artifacts
                                   (hard-linked into each; kept so new units reuse it)
    OUT/index.json, index.html, junit.xml
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from .. import manifest as mf
from ..errors import ManifestError, OutputError, SpecError
from ..fsutil import file_sha256, link_or_copy, write_text_atomic
from ..verify import changed_files
from .index import html as index_html, junit as index_junit, key_measures
from .executors import make as make_executor
from .spec import FleetSpec, Unit, load_spec, parse_shard, shard
from .unit import SHARED_DIR, STATE_SUFFIX, state_path

INDEX = "index.json"
MARKER = ".loradeploy-fleet"  # written first: a killed run's folder is still a fleet output to resume into


@dataclass(frozen=True)
class FleetConfig:
    """The ``fleet run`` verb's inputs."""

    spec: Path
    out: Path
    executor: str = "local"
    workers: int | None = None  # local: pool size (default: the cores); ray: CPUs of a local cluster
    shard: str | None = None  # "I/N"
    force: bool = False  # run every unit even when up to date


def unit_threads(units) -> int:
    """The most runtime threads a unit runs with (0, every core, when any profile says so)."""
    from ..profile import load_profile

    threads = [load_profile(t).threads for t in {u.target for u in units}]
    return 0 if not threads or 0 in threads else max(threads)


def _state(out: Path, unit: Unit) -> dict | None:
    try:
        return json.loads(state_path(out, unit).read_text())
    except (OSError, ValueError):
        return None


def artifact_files(folder: Path) -> dict[str, str] | None:
    """The artifact's files and sha256 when it is as exported (``verify``'s file check: every
    file as its manifest lists it, none extra, the manifest's own body unedited), else None."""
    try:
        manifest = mf.read(folder)
    except ManifestError:
        return None
    if changed_files(folder, manifest, sha256=file_sha256):
        return None
    return {f.path: f.sha256 for f in sorted(manifest.files, key=lambda f: f.path)}


def up_to_date(out: Path, unit: Unit) -> dict | None:
    """The unit's recorded result when its key is current and its artifact verifies."""
    state = _state(out, unit)
    if not state or state.get("key") != unit.key or state.get("status") not in ("pass", "fail"):
        return None
    return state if artifact_files(out / unit.id) is not None else None


def unit_entry(out: Path, unit: Unit, result: dict) -> dict:
    """The index's row for a unit: result, key measures, bytes, files and their sha256."""
    entry = {"id": unit.id, "adapter": unit.adapter, "target": unit.target_name, "profile": unit.target,
             "key": unit.key, "status": result.get("status", "error"), "ran": bool(result.get("ran")),
             "seconds": result.get("seconds"), "artifact": None}
    if result.get("message"):
        entry["message"] = result["message"]
    folder = out / unit.id
    if entry["status"] in ("pass", "fail") and (folder / mf.MANIFEST).is_file():
        manifest = mf.read(folder)
        v = manifest.validation
        entry.update(artifact=unit.id, report=f"{unit.id}/{mf.REPORT}", mode=manifest.mode,
                     bytes=v.artifact_bytes if v else None,
                     shared_base=bool(manifest.decisions.get("shared_base_graph")),
                     measures=key_measures(v), failed=[f"{c['adapter']}: {c['measure']}"
                                                                   for c in (v.checks if v else [])
                                                                   if c["status"] == "FAIL"]
                     or ([v.verdict] if v and not v.passed and v.verdict else []),  # nothing gated
                     files={f.path: f.sha256 for f in manifest.files})
    return entry


def run_fleet(config: FleetConfig, progress: Callable | None = None) -> dict:
    """Run the spec's units (this shard's) into ``config.out``; returns the index."""
    spec = load_spec(config.spec)
    units = spec.units
    shard_text = None
    if config.shard:
        i, n = parse_shard(config.shard)
        units, shard_text = shard(units, i, n), f"{i}/{n}"
    executor = make_executor(config.executor, config.workers, spec.resources, unit_threads(units))
    out = Path(config.out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"{out}: folder exists, is not empty and is not a fleet output; give a new folder or a "
                          "fleet's output")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"spec": str(spec.path), "spec_sha256": spec.sha256}) + "\n")
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    todo = []
    for u in units:
        state = None if config.force else up_to_date(out, u)
        if state is not None:
            results[u.id] = {**state, "ran": False}
        else:
            todo.append(u)
    report = progress or (lambda *_a: None)
    report("start", len(units), len(todo))
    for u in units:
        if u.id in results:
            report("unit", u.id, results[u.id])

    def done(unit: Unit, result: dict) -> None:
        results[unit.id] = result
        report("unit", unit.id, result)

    executor.run(sorted(todo, key=lambda u: (u.target_name, u.adapter)), out, done)
    if not shard_text:
        remove_unused_shared(out, results.values())
    index = build_index(out, spec, units, results, {**executor.describe(), "shard": shard_text,
                                                    "wall_seconds": round(time.perf_counter() - t0, 3)})
    write_index(out, index)
    return index


def remove_unused_shared(out: Path, results) -> list[Path]:
    """Remove the shared base graphs no unit of the spec uses any more (an older toolchain's, or
    a removed target's): the artifacts that used them hold their own hard links."""
    keep = {r.get("shared") for r in results if r.get("shared")}
    removed = []
    for folder in sorted((out / SHARED_DIR).glob("*/*")):
        if folder.is_dir() and folder.relative_to(out).as_posix() not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            (folder.parent / f".{folder.name}.lock").unlink(missing_ok=True)
            removed.append(folder)
    return removed


def build_index(out: Path, spec: FleetSpec, units, results: dict, run: dict) -> dict:
    entries = [unit_entry(out, u, results[u.id]) for u in sorted(units, key=lambda u: u.id)]
    counts = {s: sum(e["status"] == s for e in entries) for s in ("pass", "fail", "error")}
    return {"fleet": {"spec": str(spec.path), "spec_sha256": spec.sha256, "loradeploy_version": __version__, **run},
            "summary": {"units": len(entries), **counts, "ran": sum(e["ran"] for e in entries),
                        "up_to_date": sum(not e["ran"] for e in entries)},
            "passed": counts["fail"] == 0 and counts["error"] == 0, "units": entries}


def write_index(out: Path, index: dict) -> None:
    write_text_atomic(out / "junit.xml", index_junit(index))
    write_text_atomic(out / "index.html", index_html(index))
    write_text_atomic(out / INDEX, json.dumps(index, indent=2, default=str) + "\n")


# --- shards ----------------------------------------------------------------------------------

def merge_shards(folders: list[Path], out: Path) -> dict:
    """One fleet output from the outputs of ``fleet run --shard I/N`` (every shard of one spec,
    once): their unit folders and states copied into ``out`` and one index over all units."""
    indexes = []
    for folder in folders:
        try:
            indexes.append((Path(folder), json.loads((Path(folder) / INDEX).read_text())))
        except (OSError, ValueError) as e:
            raise SpecError(f"{folder}: not a fleet output ({INDEX}: {e.strerror if isinstance(e, OSError) else e})") from e
    specs = {ix["fleet"]["spec_sha256"] for _, ix in indexes}
    if len(specs) != 1:
        raise SpecError("the shards were run from different specs (their spec_sha256 differ)")
    shards = [ix["fleet"].get("shard") for _, ix in indexes]
    if None in shards:
        raise SpecError(f"{indexes[shards.index(None)][0]}: not a shard's output (run with --shard I/N)")
    counts = {int(s.split("/")[1]) for s in shards}
    seen = sorted(int(s.split("/")[0]) for s in shards)
    if len(counts) != 1 or seen != list(range(next(iter(counts)))):
        raise SpecError(f"shards {', '.join(sorted(shards))}: expected each of 0..N-1 once for one N")
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: folder exists and is not empty")
    tmp = out.with_name(f".{out.name}.partial-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries, seen = [], {}
        for folder, ix in indexes:
            for e in ix["units"]:
                if e.get("artifact"):
                    _copy_artifact(folder / e["id"], tmp / e["id"], e.get("files") or {}, seen)
                state = folder / f"{e['id']}{STATE_SUFFIX}"
                if state.is_file():
                    (tmp / e["target"]).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(state, tmp / f"{e['id']}{STATE_SUFFIX}")
                entries.append(e)
            _copy_shared(folder / SHARED_DIR, tmp / SHARED_DIR, seen)
        entries.sort(key=lambda e: e["id"])
        counts = {s: sum(e["status"] == s for e in entries) for s in ("pass", "fail", "error")}
        first = indexes[0][1]["fleet"]
        index = {"fleet": {**first, "shard": None, "merged_from": [str(f) for f, _ in indexes],
                           "wall_seconds": sum(ix["fleet"].get("wall_seconds") or 0 for _, ix in indexes)},
                 "summary": {"units": len(entries), **counts, "ran": sum(e["ran"] for e in entries),
                             "up_to_date": sum(not e["ran"] for e in entries)},
                 "passed": counts["fail"] == 0 and counts["error"] == 0, "units": entries}
        write_index(tmp, index)
        (tmp / MARKER).write_text(json.dumps({"spec": first["spec"], "spec_sha256": first["spec_sha256"]}) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _copy_shared(src: Path, dst: Path, seen: dict[str, Path]) -> None:
    """The shards' shared base graphs (and their latency records), so that a later ``fleet run``
    into the merged output reuses them: one folder per key (the same key is the same graph in
    every shard; a latency record already copied from another shard is kept); a file some
    artifact already holds becomes a hard link to it."""
    for folder in sorted(p for p in src.glob("*/*") if p.is_dir()):
        for f in sorted(folder.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            target = dst / folder.relative_to(src) / f.relative_to(folder)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            sha = file_sha256(f)
            if sha in seen:
                link_or_copy(seen[sha], target)
            else:
                shutil.copy2(f, target)
                seen[sha] = target


def _copy_artifact(src: Path, dst: Path, shas: dict[str, str], seen: dict[str, Path]) -> None:
    """Copy an artifact folder; a file whose sha256 an earlier copy has (the shared base graph)
    becomes a hard link to it, as in the shards' own outputs."""
    for p in sorted(src.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src).as_posix()
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        sha = shas.get(rel)
        if sha and sha in seen:
            link_or_copy(seen[sha], target)
        else:
            shutil.copy2(p, target)
            if sha:
                seen[sha] = target

