"""What every runtime session shares: the adapter table with deferred frees, the checks an
adapter passes before it is loaded, and the call's result."""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BaseModelError, LoradeployError

MAX_LENGTH = 128  # tokens per input, as validation uses
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # loradeploy.manifest's; not imported: it pulls in PyTorch


def read_manifest(artifact: Path) -> dict:
    """An artifact's manifest (runtime side: no PyTorch)."""
    path = Path(artifact) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoradeployError(f"{path}: no readable manifest, not a loradeploy artifact ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise LoradeployError(f"{path}: not a loradeploy manifest (version {MANIFEST_VERSION})")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    fingerprint: str  # the file's sha256 (a folder: sha256 of its files' list): what a run reports
    artifact: Path  # the artifact the adapter was exported in


@dataclass(frozen=True)
class Result:
    outputs: np.ndarray
    adapter: str | None
    fingerprint: str | None


class Loaded:
    """An adapter held by a session: freed once unloaded and no call uses it."""

    def __init__(self, info: AdapterInfo, handle):
        self.info, self.handle = info, handle
        self.users, self.retired, self.freed = 0, False, False


# -- checks on load ---------------------------------------------------------------------------

def _owner(path: Path) -> tuple[Path, dict]:
    artifact = path.parent.parent
    if path.parent.name != "adapters" or not (artifact / MANIFEST).is_file():
        raise BaseModelError(f"{path}: not inside the adapters/ folder of an exported artifact (no "
                             f"{MANIFEST} above it), so its base cannot be checked; load adapters "
                             "from an artifact exported by `loradeploy export --mode swappable`")
    return artifact, read_manifest(artifact)


def _base_shas(manifest: dict) -> list[str]:
    return sorted(w["sha256"] for w in manifest.get("base", {}).get("weights", []))


def check_provenance(session_manifest: dict, path: Path) -> tuple[Path, str]:
    """The artifact holding adapter ``path`` and the adapter's fingerprint, after checking that
    artifact's manifest against the session's (runtime, base sha256, task) and the adapter's
    files against the sha256 recorded there."""
    path = Path(path).absolute()
    if not path.exists():
        raise LoradeployError(f"{path}: no such adapter file or folder")
    artifact, theirs = _owner(path)
    rel = path.relative_to(artifact).as_posix()
    ours_rt, theirs_rt = session_manifest["target"]["runtime"], theirs["target"]["runtime"]
    if theirs_rt != ours_rt:
        raise BaseModelError(f"{path}: an adapter for {theirs_rt}, this session runs {ours_rt}; export the "
                             f"adapter with a target for {ours_rt}")
    if _base_shas(theirs) != _base_shas(session_manifest):
        short = lambda m: ", ".join(s[:12] for s in _base_shas(m))  # noqa: E731
        raise BaseModelError(f"{path}: exported for base {theirs['base'].get('spec')} (weights sha256 {short(theirs)}), "
                             f"this session's base is {session_manifest['base'].get('spec')} "
                             f"({short(session_manifest)}); export the adapter on this base")
    for key in ("task", "num_labels"):
        if theirs.get(key) != session_manifest.get(key):
            raise BaseModelError(f"{path}: {key} {theirs.get(key)!r}, this session's is {session_manifest.get(key)!r}")
    if not any(a.get("file") == rel for a in theirs.get("adapters", [])):
        raise BaseModelError(f"{path}: not an adapter of {artifact} (its manifest lists no adapter {rel})")
    files = [f for f in theirs["files"] if f["path"] == rel or f["path"].startswith(rel + "/")]
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        if not (artifact / f["path"]).is_file() or sha256_file(artifact / f["path"]) != f["sha256"]:
            raise BaseModelError(f"{artifact / f['path']}: missing or changed since export (sha256 differs "
                                 "from its manifest); export it again")
        digest.update(f"{f['path'].removeprefix(rel)}:{f['sha256']}\n".encode())
    if not files:
        raise BaseModelError(f"{path}: its manifest records no files for it")
    single = len(files) == 1 and files[0]["path"] == rel
    return artifact, files[0]["sha256"] if single else digest.hexdigest()


def refuse(path: Path, what: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BaseModelError(f"{path}: does not fit this session's {what}: {problems[0]}{more}")


# -- sessions ---------------------------------------------------------------------------------

class Session(ABC):
    """A swappable artifact loaded in its runtime: the base once, adapters loaded by name."""

    runtime = ""

    def __init__(self, artifact: Path, manifest: dict):
        self.artifact, self.manifest = Path(artifact), manifest
        self.task = manifest["task"]
        self._lock = threading.Lock()
        self._adapters: dict[str, Loaded] = {}

    @property
    def adapters(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            if name not in self._adapters:
                raise LoradeployError(f"adapter {name!r} is not loaded (loaded: {', '.join(self._adapters) or 'none'})")
            return self._adapters[name].info

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Check adapter ``path`` against this base (see the module doc) and load it as ``name``."""
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise LoradeployError(f"adapter name {name!r}: use letters, digits, '-', '_' or '.'")
        if self.manifest.get("mode") != "swappable":
            raise LoradeployError(f"{self.artifact}: a merged artifact takes no adapters; export with --mode swappable")
        if name in self.adapters:
            raise LoradeployError(f"adapter {name!r} is already loaded; unload it first or use another name")
        artifact, fingerprint = check_provenance(self.manifest, Path(path))
        self._check_tensors(Path(path))
        rec = Loaded(AdapterInfo(name, Path(path).absolute(), fingerprint, artifact), self._load(name, Path(path)))
        with self._lock:
            clash = name in self._adapters
            if not clash:
                self._adapters[name] = rec
        if clash:
            self._free(rec)
            raise LoradeployError(f"adapter {name!r} was loaded meanwhile by another caller")
        return rec.info

    def unload_adapter(self, name: str) -> None:
        """Forget ``name``; its memory is released when the calls still using it return."""
        with self._lock:
            rec = self._adapters.pop(name, None)
            if rec is None:
                raise LoradeployError(f"adapter {name!r} is not loaded (loaded: {', '.join(self._adapters) or 'none'})")
            rec.retired = True
        self._maybe_free(rec)

    def run(self, inputs: Mapping[str, np.ndarray], adapter: str | None = None) -> Result:
        """Outputs for one batch (``input_ids``/``attention_mask``) with ``adapter`` applied:
        logits (classifiers; last position for language models) or mean-pooled embeddings."""
        with self._lock:
            rec = None if adapter is None else self._adapters.get(adapter)
            if adapter is not None and rec is None:
                raise LoradeployError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._adapters) or 'none'})")
            if rec is not None:
                rec.users += 1
        try:
            out = self._run(inputs, rec)
        finally:
            if rec is not None:
                with self._lock:
                    rec.users -= 1
                self._maybe_free(rec)
        return Result(out, adapter, rec.info.fingerprint if rec else None)

    def _maybe_free(self, rec: Loaded) -> None:
        with self._lock:
            if not rec.retired or rec.users or rec.freed:
                return
            rec.freed = True
        self._free(rec)

    def close(self) -> None:
        for name in self.adapters:
            self.unload_adapter(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @abstractmethod
    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``input_ids``/``attention_mask`` for ``texts`` with the artifact's tokenizer."""

    @abstractmethod
    def _check_tensors(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, name: str, path: Path): ...

    @abstractmethod
    def _free(self, rec: Loaded) -> None: ...

    @abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray], rec: Loaded | None) -> np.ndarray: ...


class HfTokenizer:
    """``encode`` with the artifact's Hugging Face tokenizer, as validation tokenizes. One call
    at a time: a fast tokenizer that pads/truncates changes its own settings per call and
    raises "Already borrowed" when two threads do so at once."""

    _tokenizer_lock = threading.Lock()

    def encode(self, texts):
        import transformers

        with self._tokenizer_lock:
            if getattr(self, "_tokenizer", None) is None:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.artifact))
            enc = self._tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
