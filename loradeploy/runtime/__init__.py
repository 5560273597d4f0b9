"""On-device A/B adapter swapping: one API over onnxruntime, llama.cpp and transformers + PEFT.

``open(ARTIFACT)`` loads a swappable artifact's base once in its own runtime and returns a
:class:`Session`; ``load_adapter(name, path)`` / ``unload_adapter(name)`` change the adapters
it holds and ``run(inputs, adapter=name)`` (``None``: the base alone) returns the outputs with
the name and the fingerprint (sha256 of the files) of the adapter that was applied.

Thread safety, per runtime:

* onnxruntime: one ``InferenceSession`` (``run`` is thread-safe); every call builds its own
  ``RunOptions`` with its adapter active, so concurrent calls never share adapter state.
* llama.cpp: one ``llama_model``; adapters are loaded once on the model and activated per
  context. A context is not shareable across threads, so the session keeps a pool of
  ``workers`` contexts; a call borrows one, and adapters on a context only change while the
  pool's lock is held (a freed adapter is never left set on an idle context).
* transformers + PEFT: ``set_adapter`` mutates the model, so calls are serialized by one lock
  (PyTorch's intra-op threads still use every core for each call).

An adapter is freed only after the calls using it have returned (unload defers it).

Adapters are checked before they are loaded: the adapter must sit in the ``adapters/`` folder
of an exported artifact whose ``manifest.json`` names the same runtime, base weights (sha256),
task and label count, and lists the adapter's files with the sha256 they still have; then its
tensor names and shapes are checked against the loaded base (graph inputs, GGUF tensors, the
PyTorch modules). A mismatch raises :class:`~loradeploy.errors.BaseModelError` and changes
nothing.

:class:`ABRouter` assigns a caller's key to an arm by sha256 (stable across processes and
machines), counts requests and latencies per arm, and replaces an arm's adapter atomically
while serving.
"""

from __future__ import annotations

from pathlib import Path

from .. import registry
from ..manifest import read as read_manifest
from .router import ABRouter, Routed
from .session import AdapterInfo, Result, Session, check_provenance

__all__ = ["ABRouter", "AdapterInfo", "Result", "Routed", "Session", "check_provenance", "open"]


def open(artifact: str | Path, *, adapters: bool = True, threads: int = 0, workers: int = 2) -> Session:  # noqa: A001
    """A :class:`Session` for ``artifact`` in its runtime (the one loader: validation, ``verify``,
    the latency worker and ``ab`` all open artifacts through it); with ``adapters`` the
    artifact's own adapters are loaded under their names. ``workers``: llama.cpp contexts (calls
    in parallel); ``threads``: intra-op threads per call (0: the runtime's default / cores per
    worker)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    session = registry.get(manifest.runtime).session_class()(artifact, manifest, threads=threads, workers=workers)
    if adapters and manifest.mode == "swappable":
        try:
            for a in manifest.swappable_adapters:
                session.load_adapter(a.name, artifact / a.file)
        except BaseException:
            session.close()
            raise
    return session
