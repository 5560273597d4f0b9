"""The ``ab`` verb: serve a file of requests through an :class:`ABRouter` on one session and
report per-arm counts, latency and how often the arms' outputs agree."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LoradeployError
from . import open as open_session
from .router import ABRouter

BASE_ARM = "-"  # an arm value meaning "the base alone"
COSINE_AGREE = 0.99  # embeddings "agree" at this cosine or above


def parse_arms(specs: list[str]) -> dict[str, str | None]:
    """``NAME=PATH`` (or ``NAME=ADAPTER`` of the artifact, or ``NAME=-`` for the base alone)."""
    arms: dict[str, str | None] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise LoradeployError(f"--arm {spec!r}: write NAME=PATH (or NAME=- for the base alone)")
        if name in arms:
            raise LoradeployError(f"--arm {name} given twice")
        arms[name] = None if value == BASE_ARM else value
    if not arms:
        raise LoradeployError("give at least one --arm NAME=PATH")
    return arms


def parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise LoradeployError(f"--weights {text!r}: comma-separated numbers, one per arm (e.g. 50,50)") from None
    if len(weights) != n:
        raise LoradeployError(f"--weights {text!r}: {len(weights)} weights for {n} arms")
    return weights


def _keys(path: Path | None, n: int) -> list[str]:
    if path is None:
        return [str(i) for i in range(n)]
    keys = [k for k in Path(path).read_text().splitlines() if k.strip()]
    if len(keys) < n:
        raise LoradeployError(f"{path}: {len(keys)} keys for {n} inputs; give one key (user id) per line per input")
    return keys[:n]


def agree(outputs: list[np.ndarray], task: str) -> bool:
    """Whether every arm gives the same answer: top-1 (class, next token), or for embeddings a
    cosine of at least :data:`COSINE_AGREE` to the first arm's."""
    if task == "feature-extraction":
        ref = outputs[0].ravel()
        return all(float(o.ravel() @ ref) / (np.linalg.norm(o) * np.linalg.norm(ref) + 1e-12) >= COSINE_AGREE
                   for o in outputs[1:])
    return len({int(o.argmax(-1).ravel()[0]) for o in outputs}) == 1


def ab_test(artifact: Path, arms: dict[str, str | None], weights: list[float] | None, inputs: Path,
            keys: Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Serve every line of ``inputs`` (JSON lines ``{text}`` or .txt) as one request for its key,
    routed to an arm; also run the other arms on it (not counted) to measure agreement."""
    from ..evaldata import load_eval

    step = progress or (lambda _msg: None)
    session = open_session(artifact)
    try:
        router = ABRouter(session, arms, weights)
        step(f"opened {session.runtime} session, arms {', '.join(router.names)}")
        texts = load_eval(inputs, lm=session.task == "causal-lm").texts
        agreed = 0
        for text, key in zip(texts, _keys(keys, len(texts))):
            request = session.encode([text])
            routed = router.run(key, request)
            others = [session.run(request, router.adapter(a)).outputs for a in router.names if a != routed.arm]
            agreed += agree([routed.outputs, *others], session.task)
        step(f"served {len(texts)} requests")
        snapshot = router.snapshot()
    finally:
        session.close()
    return {"artifact": str(Path(artifact).absolute()), "runtime": snapshot["runtime"], "task": session.task,
            "inputs": str(inputs), "requests": len(texts), "agreement": agreed / len(texts) if texts else None,
            "agreement_measure": f"cosine >= {COSINE_AGREE}" if session.task == "feature-extraction" else "same top-1",
            "router": snapshot}
