"""What every runtime session shares: the protocol every caller uses (validation, ``verify``,
the latency worker, ``ab`` and the A/B router), the adapter table with deferred frees, the checks
an adapter passes before it is loaded, and the call's result.

The protocol: a session is opened on an artifact (the base once); ``load_adapter`` /
``unload_adapter`` / ``adapters``; ``run(inputs, adapter)`` for one batch; for language models
``tokenize(text)`` and ``logits(tokens, adapter)`` (every position); ``measure(...)`` for the
latency worker; ``close``. Class-level: ``reference_unit(threads)`` (a fixed unit of work in this
runtime), ``FILE_CHECKS`` (format checks of the runtime's files, used by ``verify``) and
``open_base(path)`` (the base alone, where the base is itself a runtime file)."""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Mapping

import numpy as np

from ..errors import BaseModelError, LoradeployError
from ..fsutil import sha256_file
from ..evaldata import MAX_LENGTH
from ..manifest import ADAPTER_DIR, ADAPTER_NAME_RULE, MANIFEST, Manifest, is_adapter_name, read


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


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the generated tokens (the prompt's not included)
    text: str
    adapter: str | None
    fingerprint: str | None
    prompt_tokens: int


class Loaded:
    """An adapter held by a session: freed once unloaded and no call uses it."""

    def __init__(self, info: AdapterInfo, handle):
        self.info, self.handle = info, handle
        self.users, self.retired, self.freed = 0, False, False


# -- checks on load ---------------------------------------------------------------------------

def _owner(path: Path) -> tuple[Path, Manifest]:
    artifact = path.parent.parent
    if path.parent.name != ADAPTER_DIR or not (artifact / MANIFEST).is_file():
        raise BaseModelError(f"{path}: not inside the adapters/ folder of an exported artifact (no "
                             f"{MANIFEST} above it), so its base cannot be checked; load adapters "
                             "from an artifact exported by `loradeploy export --mode swappable`")
    return artifact, read(artifact)


def check_provenance(ours: Manifest, path: Path) -> tuple[Path, str]:
    """The artifact holding adapter ``path`` and the adapter's fingerprint, after checking that
    artifact's manifest against the session's (runtime, base sha256, task) and the adapter's
    files against the sha256 recorded there."""
    path = Path(path).absolute()
    if not path.exists():
        raise LoradeployError(f"{path}: no such adapter file or folder")
    artifact, theirs = _owner(path)
    rel = path.relative_to(artifact).as_posix()
    if theirs.runtime != ours.runtime:
        raise BaseModelError(f"{path}: an adapter for {theirs.runtime}, this session runs {ours.runtime}; export the "
                             f"adapter with a target for {ours.runtime}")
    if theirs.base.shas != ours.base.shas:
        short = lambda m: ", ".join(s[:12] for s in m.base.shas)  # noqa: E731
        raise BaseModelError(f"{path}: exported for base {theirs.base.spec} (weights sha256 {short(theirs)}), "
                             f"this session's base is {ours.base.spec} ({short(ours)}); export the adapter on this base")
    for key in ("task", "num_labels"):
        if getattr(theirs, key) != getattr(ours, key):
            raise BaseModelError(f"{path}: {key} {getattr(theirs, key)!r}, this session's is {getattr(ours, key)!r}")
    if not any(a.file == rel for a in theirs.swappable_adapters):
        raise BaseModelError(f"{path}: not an adapter of {artifact} (its manifest lists no adapter {rel})")
    files = [f for f in theirs.files if f.path == rel or f.path.startswith(rel + "/")]
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        if not (artifact / f.path).is_file() or sha256_file(artifact / f.path) != f.sha256:
            raise BaseModelError(f"{artifact / f.path}: missing or changed since export (sha256 differs "
                                 "from its manifest); export it again")
        digest.update(f"{f.path.removeprefix(rel)}:{f.sha256}\n".encode())
    if not files:
        raise BaseModelError(f"{path}: its manifest records no files for it")
    single = len(files) == 1 and files[0].path == rel
    return artifact, files[0].sha256 if single else digest.hexdigest()


def refuse(path: Path, what: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BaseModelError(f"{path}: does not fit this session's {what}: {problems[0]}{more}")


# -- sessions ---------------------------------------------------------------------------------

class Session(ABC):
    """An artifact loaded in its runtime: the base once, adapters loaded by name (swappable)."""

    runtime = ""
    #: file name ending → check returning a one-line problem or None (``verify``)
    FILE_CHECKS: ClassVar[dict[str, Callable[[Path], str | None]]] = {}

    def __init__(self, artifact: Path, manifest: Manifest):
        self.artifact, self.manifest = Path(artifact), manifest
        self.task = manifest.task
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
        if not is_adapter_name(name):
            raise LoradeployError(f"adapter name {name!r}: {ADAPTER_NAME_RULE}")
        if self.manifest.mode != "swappable":
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
        with self.holding(adapter) as rec:
            out = self._run(inputs, rec)
        return Result(out, adapter, rec.info.fingerprint if rec else None)

    @contextmanager
    def holding(self, adapter: str | None):
        """The loaded adapter ``adapter`` (None: the base alone), kept from being freed while the
        block runs, even if another caller unloads it meanwhile."""
        with self._lock:
            rec = None if adapter is None else self._adapters.get(adapter)
            if adapter is not None and rec is None:
                raise LoradeployError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._adapters) or 'none'})")
            if rec is not None:
                rec.users += 1
        try:
            yield rec
        finally:
            if rec is not None:
                with self._lock:
                    rec.users -= 1
                self._maybe_free(rec)

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 32) -> "Generation":
        """Greedy generation from ``prompt`` with ``adapter`` active, up to the end-of-sequence
        token (language models)."""
        raise LoradeployError(f"{self.runtime} sessions of task {self.task} do not generate text")

    def greedy(self, tokens: list[int], adapter: str | None = None, n: int = 32) -> list[int]:
        """Exactly ``n`` greedy tokens after ``tokens`` (no stop at end-of-sequence)."""
        raise LoradeployError(f"{self.runtime} sessions of task {self.task} do not generate text")

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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text (language models), as the runtime tokenizes it."""
        return [int(t) for t in self.encode([text])["input_ids"][0]]

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of every position (language models)."""
        raise LoradeployError(f"{self.runtime} sessions give per-position logits only for language models")

    def measure(self, adapter: str | None, shapes: list[tuple[int, int]], warmup: int, runs: int,
                reference: Callable[[], float]) -> dict:
        """Latency per ``(batch, seq)`` shape, interleaved with ``reference`` (see loradeploy.timing)."""
        from ..timing import time_session

        return {"shapes": {f"b{b}xs{s}": time_session(self, adapter, b, s, warmup, runs, reference)
                           for b, s in shapes}}

    def runtime_checks(self, texts: list[str], progress=None) -> tuple[dict, list[tuple[str, float, float | None, str]]]:
        """Checks only this runtime makes on its artifact after the fidelity run on the eval
        ``texts`` (the web bundle: its own tokenizer against the reference's, the browser's
        outputs against the session's): metrics recorded by name in the validation, and rows
        ``(measure, value, budget, direction)`` judged like every check (label ``artifact``).
        Default: none."""
        return {}, []

    def runtime_version(self) -> str | None:
        """The version of the runtime that runs this artifact, for the latency fingerprint; None:
        its Python distribution's installed version (``RuntimeSpec.distribution``)."""
        return None

    @staticmethod
    @abstractmethod
    def reference_unit(threads: int = 0) -> Callable[[], float]:
        """A fixed unit of work in this runtime, independent of any artifact (the same weights on
        every machine), returning ms per call: latency is compared as a ratio to it."""

    @classmethod
    def timing_signature(cls, adapter_file: Path) -> dict | None:
        """What an adapter file brings to the computation besides its values — each tensor's
        name, type and shape — where that is all it brings (two adapters alike here run the same
        kernels on the same graph, so they time alike); None: not known, always timed."""
        return None

    @classmethod
    def open_base(cls, base: Path, threads: int = 0) -> "Session | None":
        """The base alone in this runtime, when the base is itself a runtime file (a GGUF)."""
        return None

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

    def _hf_tokenizer(self):
        import transformers

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.artifact))
        return self._tokenizer

    def encode(self, texts):
        with self._tokenizer_lock:
            enc = self._hf_tokenizer()(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def tokenize(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self._hf_tokenizer()(text)["input_ids"])
