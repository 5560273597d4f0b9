"""The ``verify`` verb: is an artifact exactly what its manifest says, is each file sane for its
format, and does it load and run in its runtime? Problems name the file; nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import manifest as mf
from . import registry
from .errors import ArtifactChangedError, LoradeployError
from .fsutil import sha256_file


def _files(artifact: Path) -> set[str]:
    return {p.relative_to(artifact).as_posix() for p in artifact.rglob("*")
            if p.is_file() and p.name not in (mf.MANIFEST, mf.REPORT)}


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        for key in f.keys():
            f.get_slice(key)


#: checks of the files every artifact may hold; each runtime's session adds its own (FILE_CHECKS)
COMMON_CHECKS = {".safetensors": _check_safetensors, ".json": lambda path: json.loads(path.read_text()) and None}


def _format_problem(path: Path, checks: dict) -> str | None:
    """One line on what is wrong with ``path`` as a file of its kind, or None."""
    check = next((fn for suffix, fn in checks.items() if path.name.endswith(suffix)), None)
    if check is None:
        return None
    try:
        return check(path)
    except Exception as e:  # any library's complaint is the file's problem  # noqa: BLE001
        text = str(e).strip().splitlines()
        return f"not a valid {path.suffix.lstrip('.')} file ({text[0][:200] if text else type(e).__name__})"


def _smoke_run(artifact: Path, manifest: mf.Manifest) -> list[str]:
    """Load the artifact in its runtime (its session) and run a tiny input with each adapter."""
    from . import runtime

    session = runtime.open(artifact, workers=1)
    try:
        ran = []
        for name in [a.name for a in manifest.swappable_adapters] or [None]:
            if manifest.task == "causal-lm":
                out = session.logits(session.tokenize("The food was"), name)
            else:
                ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
                out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}, name).outputs
            if not np.all(np.isfinite(out)):
                raise LoradeployError(f"{artifact}: {name or 'merged'} gives NaN/Inf outputs in {manifest.runtime}")
            ran.append(name or "merged")
    finally:
        session.close()
    return ran


def changed_files(artifact: Path, manifest: mf.Manifest, sha256=sha256_file) -> list[dict]:
    """Each way ``artifact`` differs from its manifest — a listed file missing, of another size
    or sha256, a file not listed, the manifest's own body edited — as ``{"file", "problem"}``
    (empty: the artifact is as exported). The check ``verify``, ``validate`` and ``check`` make
    before anything else; ``sha256``: how a file is hashed (a caller may cache)."""
    problems = []
    present = _files(artifact)
    for entry in manifest.files:
        path = artifact / entry.path
        if entry.path not in present:
            problems.append({"file": entry.path, "problem": "missing (listed in the manifest)"})
        elif path.stat().st_size != entry.bytes:
            problems.append({"file": entry.path, "problem": f"{path.stat().st_size:,} bytes, the manifest says "
                                                            f"{entry.bytes:,}"})
        elif sha256(path) != entry.sha256:
            problems.append({"file": entry.path, "problem": "sha256 differs from the manifest (the file was changed)"})
    for rel in sorted(present - {f.path for f in manifest.files}):
        problems.append({"file": rel, "problem": "not listed in the manifest"})
    if mf.self_check(artifact / mf.MANIFEST) is False:
        problems.append({"file": mf.MANIFEST, "problem": f"its body differs from its {mf.SELF_SHA256} (the manifest "
                                                         "was edited after export)"})
    return problems


def read_unchanged(artifact: Path) -> mf.Manifest:
    """The manifest of ``artifact`` once every file matches it (:func:`changed_files`); else
    :class:`ArtifactChangedError` (exit 1) naming the first that does not."""
    manifest = mf.read(artifact)
    problems = changed_files(Path(artifact), manifest)
    if problems:
        raise ArtifactChangedError(Path(artifact), problems)
    return manifest


def verify(artifact: Path, load: bool = True) -> dict:
    """Check ``artifact`` against its manifest. Returns a record with ``problems`` (each naming
    a file) and ``notes``; raises :class:`LoradeployError` when it is not an artifact at all."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise LoradeployError(f"{artifact}: no such artifact folder")
    manifest = mf.read(artifact)
    registry.get(manifest.runtime)  # a runtime loradeploy knows, else one error line
    # every file of a known kind is checked, whichever runtime the artifact is for
    checks = {**COMMON_CHECKS, **{k: v for spec in registry.specs() for k, v in spec.session_class().FILE_CHECKS.items()}}
    problems = changed_files(artifact, manifest)
    failed = {p["file"] for p in problems}
    for entry in manifest.files:
        bad = None if entry.path in failed else _format_problem(artifact / entry.path, checks)
        if bad:
            problems.append({"file": entry.path, "problem": bad})
    notes = [] if mf.self_check(artifact / mf.MANIFEST) is not None else [
        f"{mf.MANIFEST} records no {mf.SELF_SHA256} (written before loradeploy recorded one): its own contents, "
        "the measurements among them, are not checked; export again to protect them"]
    record = {"artifact": str(artifact.absolute()), "target": manifest.target.name, "runtime": manifest.runtime,
              "files_checked": len(manifest.files), "problems": problems, "notes": notes, "loaded": False, "ran": []}
    if load and not problems:
        try:
            record["ran"] = _smoke_run(artifact, manifest)
            record["loaded"] = True
        except Exception as e:  # the runtime (or the session's checks) refused it  # noqa: BLE001
            text = str(e).strip().splitlines()
            record["problems"].append({"file": ".", "problem": f"does not load in {record['runtime']}: "
                                                                f"{text[0][:200] if text else type(e).__name__}"})
    record["ok"] = not record["problems"]
    return record
