"""The ``verify`` verb: is an artifact exactly what its manifest says, is each file sane for its
format, and does it load and run in its runtime? Problems name the file; nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import manifest as mf
from .errors import LoradeployError
from .tensorio import sha256_file


def _files(artifact: Path) -> set[str]:
    return {p.relative_to(artifact).as_posix() for p in artifact.rglob("*")
            if p.is_file() and p.name not in (mf.MANIFEST, mf.REPORT)}


def _format_problem(path: Path) -> str | None:
    """One line on what is wrong with ``path`` as a file of its kind, or None."""
    name = path.name
    try:
        if name.endswith(".onnx"):
            import onnx

            onnx.checker.check_model(str(path))
        elif name.endswith(".onnx_adapter"):
            import onnxruntime as ort

            ort.LoraAdapter().Load(str(path))
        elif name.endswith(".gguf"):
            with open(path, "rb") as f:
                head = f.read(8)
            if head[:4] != b"GGUF":
                return "not a GGUF file (bad magic)"
            if path.stat().st_size < 64 * 2**20:  # adapter files: read every tensor's header
                import gguf

                gguf.GGUFReader(str(path))
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                for key in f.keys():
                    f.get_slice(key)
        elif name.endswith(".json"):
            json.loads(path.read_text())
    except Exception as e:  # any library's complaint is the file's problem  # noqa: BLE001
        text = str(e).strip().splitlines()
        return f"not a valid {path.suffix.lstrip('.')} file ({text[0][:200] if text else type(e).__name__})"
    return None


def _smoke_run(artifact: Path, manifest: dict) -> list[str]:
    """Load the artifact in its runtime and run a tiny input with each adapter (or merged)."""
    from .ir import Task
    from .targets.common import get_target

    plugin = get_target(manifest["target"]["runtime"])
    runner = plugin.open(artifact, manifest)
    names = [a["name"] for a in manifest.get("adapters", []) if a.get("file")] or [None]
    ran = []
    for name in names:
        if Task(manifest["task"]) is Task.CAUSAL_LM:
            out = runner.logits(runner.tokenize("The food was"), name)
        else:
            ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
            out = runner.run(ids, np.ones_like(ids), name)
        if not np.all(np.isfinite(out)):
            raise LoradeployError(f"{artifact}: {name or 'merged'} gives NaN/Inf outputs in {plugin.runtime}")
        ran.append(name or "merged")
    return ran


def verify(artifact: Path, load: bool = True) -> dict:
    """Check ``artifact`` against its manifest. Returns a record with ``problems`` (each naming
    a file); raises :class:`LoradeployError` when it is not an artifact at all."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise LoradeployError(f"{artifact}: no such artifact folder")
    manifest = mf.read(artifact)
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) and {"path", "sha256", "bytes"} <= set(f)
                                              for f in listed):
        raise LoradeployError(f"{artifact / mf.MANIFEST}: the manifest's file list is missing or malformed")
    problems = []
    present = _files(artifact)
    for entry in listed:
        rel = entry["path"]
        path = artifact / rel
        if rel not in present:
            problems.append({"file": rel, "problem": "missing (listed in the manifest)"})
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append({"file": rel, "problem": f"{size:,} bytes, the manifest says {entry['bytes']:,}"})
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append({"file": rel, "problem": "sha256 differs from the manifest (the file was changed)"})
            continue
        bad = _format_problem(path)
        if bad:
            problems.append({"file": rel, "problem": bad})
    for rel in sorted(present - {f["path"] for f in listed}):
        problems.append({"file": rel, "problem": "not listed in the manifest"})
    record = {"artifact": str(artifact.absolute()), "target": manifest.get("target", {}).get("name"),
              "runtime": manifest.get("target", {}).get("runtime"), "files_checked": len(listed),
              "problems": problems, "loaded": False, "ran": []}
    if load and not problems:
        try:
            record["ran"] = _smoke_run(artifact, manifest)
            record["loaded"] = True
        except LoradeployError:
            raise
        except Exception as e:  # the runtime refused it  # noqa: BLE001
            record["problems"].append({"file": ".", "problem": f"does not load in {record['runtime']}: "
                                                                f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"})
    record["ok"] = not record["problems"]
    return record
