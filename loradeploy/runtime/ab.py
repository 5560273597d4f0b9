"""The ``ab`` verb: serve a file of requests through an :class:`ABRouter` on one session and
report every request's arm and answer, per arm the answers per class and the latency, and how
often the arms' outputs agree."""

from __future__ import annotations

from pathlib import Path
import numpy as np

from ..errors import LoradeployError
from ..progress import Progress, steps
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


def parse_labels(text: str | None) -> list[str] | None:
    """``--labels neg,pos``: class names in label-id order."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) < len(names):
        raise LoradeployError(f"--labels {text!r}: distinct comma-separated class names in label-id order "
                              "(e.g. neg,pos)")
    return names


def agree(outputs: list[np.ndarray], task: str) -> bool:
    """Whether every arm gives the same answer: top-1 (class, next token), or for embeddings a
    cosine of at least :data:`COSINE_AGREE` to the first arm's."""
    if task == "feature-extraction":
        ref = outputs[0].ravel()
        return all(float(o.ravel() @ ref) / (np.linalg.norm(o) * np.linalg.norm(ref) + 1e-12) >= COSINE_AGREE
                   for o in outputs[1:])
    return len({int(o.argmax(-1).ravel()[0]) for o in outputs}) == 1


def adapter_labels(session, adapter: str | None) -> list[str] | None:
    """Class names recorded in the manifest for the adapter a session serves as ``adapter`` (the
    base alone: the first adapter's, whose head the graph holds by default)."""
    from ..manifest import read as read_manifest

    manifest, file = session.manifest, None
    if adapter is not None:
        info = session.info(adapter)
        manifest = read_manifest(info.artifact) if info.artifact != session.artifact.absolute() else manifest
        file = info.path.relative_to(info.artifact).as_posix()
    records = [a for a in manifest.adapters if file is None or a.file == file]
    labels = records[0].labels if records else None
    ok = isinstance(labels, list) and len(labels) == session.manifest.num_labels and all(isinstance(n, str) for n in labels)
    return labels if ok else None


def _answer(outputs: np.ndarray, task: str, names: list[str]) -> dict:
    """What a classifier or embedding request answered, JSON-ready."""
    row = np.asarray(outputs, np.float64).reshape(-1)
    if task == "feature-extraction":
        return {"dim": int(row.size), "norm": float(np.linalg.norm(row))}
    p = np.exp(row - row.max())
    label = int(row.argmax())
    return {"label": label, "name": names[label], "score": float(p[label] / p.sum())}


def _summary(served: list[dict], arms: dict[str, list[str]], task: str) -> dict:
    """Per arm: requests, mean latency, and how many of each class it answered (classifiers) or
    how many tokens it generated on average (language models)."""
    out = {}
    for arm, classes in arms.items():
        mine = [r for r in served if r["arm"] == arm]
        row: dict = {"requests": len(mine),
                     "latency_ms_mean": float(np.mean([r["latency_ms"] for r in mine])) if mine else None}
        if task == "sequence-classification":
            names = [r["answer"]["name"] for r in mine]
            row["labels"] = {n: names.count(n) for n in classes}
        elif task == "causal-lm":
            row["new_tokens_mean"] = float(np.mean([len(r["answer"]["tokens"]) for r in mine])) if mine else None
        out[arm] = row
    return out


def ab_test(artifact: Path, arms: dict[str, str | None], weights: list[float] | None, inputs: Path,
            keys: Path | None = None, progress: Progress | None = None,
            labels: list[str] | None = None, max_new_tokens: int = 16) -> dict:
    """Serve every line of ``inputs`` (JSON lines ``{text}`` or .txt) as one request for its key,
    routed to an arm; also run the other arms on it (not counted) to measure agreement. Every
    request's arm and answer is kept: the class and its name (``labels``, else the names the
    adapter's manifest records, else the label id), the embedding's size, or for language models
    the greedy continuation of ``max_new_tokens`` tokens (then the arms agree on the same tokens)."""
    from ..evaldata import load_eval

    step = steps(progress)
    session = open_session(artifact)
    try:
        lm = session.task == "causal-lm"
        if labels is not None and (session.task != "sequence-classification" or len(labels) != session.manifest.num_labels):
            what = f"{session.manifest.num_labels} classes" if session.task == "sequence-classification" else \
                f"a {session.task} artifact, which has no classes"
            raise LoradeployError(f"--labels: {len(labels)} names for {what}")
        router = ABRouter(session, arms, weights)
        known = {a: labels or adapter_labels(session, router.adapter(a)) for a in router.names}
        ids = [str(i) for i in range(session.manifest.num_labels or 0)]
        names = {a: n or ids for a, n in known.items()}
        step(f"opened {session.runtime} session, arms {', '.join(router.names)}")
        texts = load_eval(inputs, lm=lm).texts
        agreed, served = 0, []
        for i, (text, key) in enumerate(zip(texts, _keys(keys, len(texts)))):
            if lm:
                routed = router.generate(key, text, max_new_tokens)
                answer = {"text": routed.result.text, "tokens": routed.result.tokens}
                same = all(session.generate(text, router.adapter(a), max_new_tokens).tokens == answer["tokens"]
                           for a in router.names if a != routed.arm)
            else:
                request = session.encode([text])
                routed = router.run(key, request)
                answer = _answer(routed.outputs, session.task, names[routed.arm])
                same = agree([routed.outputs, *(session.run(request, router.adapter(a)).outputs
                                                for a in router.names if a != routed.arm)], session.task)
            agreed += same
            served.append({"request": i, "key": key, "input": text, "arm": routed.arm, "adapter": arms[routed.arm],
                           "latency_ms": routed.latency_ms, "answer": answer, "agrees": bool(same)})
        step(f"served {len(texts)} requests")
        snapshot = router.snapshot()
    finally:
        session.close()
    measure = {"feature-extraction": f"cosine >= {COSINE_AGREE}", "causal-lm": f"same {max_new_tokens} greedy tokens"}
    return {"artifact": str(Path(artifact).absolute()), "runtime": snapshot["runtime"], "task": session.task,
            "inputs": str(inputs), "requests": len(texts), "agreement": agreed / len(texts) if texts else None,
            "agreement_measure": measure.get(session.task, "same top-1"),
            "labels": known if session.task == "sequence-classification" else None,
            "served": served, "arms": _summary(served, names, session.task), "router": snapshot}
