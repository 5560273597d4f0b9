"""``manifest.json``: what an artifact is made of and how it did. Reproducible parts (inputs,
decisions, files with sha256, metrics) are apart from ``environment`` (versions, machine, time),
which comparisons ignore."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import LoradeployError
from .tensorio import sha256_file

MANIFEST = "manifest.json"
REPORT = "report.html"
MANIFEST_VERSION = 1
_VERSIONED = ("torch", "transformers", "peft", "onnx", "onnxruntime", "gguf", "llama-cpp-python",
              "bitsandbytes", "safetensors", "numpy")


def file_entries(folder: Path) -> list[dict]:
    """Every file of the artifact (but the manifest and report) with its sha256 and size."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, REPORT):
            out.append({"path": p.relative_to(folder).as_posix(), "sha256": sha256_file(p),
                        "bytes": p.stat().st_size})
    return out


def environment() -> dict:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "created_unix": int(time.time()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
        "versions": versions,
    }


def profile_dict(profile) -> dict:
    d = asdict(profile)
    d["shapes"] = [{"batch": s["batch"], "seq": s["seq"]} for s in d["shapes"]]
    return d


def write(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise LoradeployError(f"{folder}: no {MANIFEST}: not a loradeploy artifact")
    return read_file(path)


def read_file(path: Path) -> dict:
    """A manifest from its own file (e.g. a baseline kept apart from its artifact)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, huge integers
        raise LoradeployError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise LoradeployError(f"{path}: not a loradeploy manifest (version {MANIFEST_VERSION})")
    return manifest


#: manifest parts that differ run to run (when and where it ran, what it measured in time)
NOT_REPRODUCIBLE = ("environment", "artifact", "validation")


def reproducible(manifest: dict) -> dict:
    """The part of a manifest that the same inputs and options reproduce byte for byte: inputs,
    decisions, adapters, profile and every file's sha256. Timings, machine facts and the output
    path are left out (``validation`` holds latency; its fidelity measures are compared by
    ``loradeploy check``)."""
    return {k: v for k, v in manifest.items() if k not in NOT_REPRODUCIBLE}


def tool() -> dict:
    return {"name": "loradeploy", "version": __version__}
