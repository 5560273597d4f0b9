"""A/B routing over a :class:`~loradeploy.runtime.session.Session`: sticky assignment of a
caller's key to an arm, per-arm counters and latency histograms, and atomic replacement of one
arm's adapter while requests are being served.

Assignment: ``u = first 8 bytes of sha256(experiment NUL key) / 2**64`` picks the arm whose
cumulative weight interval holds ``u``. It depends only on the experiment name, the key, the
arms' order and the weights, never on the process (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import LoradeployError, did_you_mean
from .session import Generation, Result, Session

#: latency histogram bucket edges (ms): 20 per decade from 10 µs to 100 s (±6% resolution)
HIST_EDGES_MS = tuple(0.01 * 10 ** (i / 20) for i in range(141))


class _Arm:
    """One arm's current adapter; replaced as a whole, never edited (but its in-flight count)."""

    def __init__(self, name: str, adapter: str | None, fingerprint: str | None, generation: int, owned: bool):
        self.name, self.adapter, self.fingerprint = name, adapter, fingerprint
        self.generation, self.owned = generation, owned  # owned: loaded by the router, unloaded by it
        self.inflight, self.retired = 0, False


class _Stats:
    def __init__(self):
        self.requests = self.errors = 0
        self.total_ms = self.max_ms = 0.0
        self.hist = [0] * (len(HIST_EDGES_MS) + 1)
        self.served: dict[str, int] = {}

    def add(self, ms: float, adapter: str | None) -> None:
        self.requests += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)
        self.hist[bisect.bisect_right(HIST_EDGES_MS, ms)] += 1
        key = adapter or "(base)"
        self.served[key] = self.served.get(key, 0) + 1

    def quantile(self, q: float) -> float | None:
        """The geometric middle of the histogram bucket holding quantile ``q``."""
        if not self.requests:
            return None
        i = int(np.searchsorted(np.cumsum(self.hist), q * self.requests))
        lo = HIST_EDGES_MS[i - 1] if i > 0 else HIST_EDGES_MS[0] / 10 ** (1 / 20)
        hi = HIST_EDGES_MS[i] if i < len(HIST_EDGES_MS) else self.max_ms
        return float(min(np.sqrt(lo * hi), self.max_ms))

    def to_dict(self) -> dict:
        buckets = [[HIST_EDGES_MS[i - 1] if i else 0.0, HIST_EDGES_MS[i] if i < len(HIST_EDGES_MS) else None, n]
                   for i, n in enumerate(self.hist) if n]
        return {"requests": self.requests, "errors": self.errors, "served_by": dict(sorted(self.served.items())),
                "latency_ms": {"p50": self.quantile(0.5), "p95": self.quantile(0.95),
                               "mean": self.total_ms / self.requests if self.requests else None,
                               "max": self.max_ms if self.requests else None,
                               "histogram": buckets}}


@dataclass(frozen=True)
class Routed:
    arm: str
    generation: int  # which of the arm's adapters (0: the first, +1 per replace_arm)
    result: Result | Generation  # a Generation from :meth:`ABRouter.generate`
    latency_ms: float

    @property
    def outputs(self) -> np.ndarray:
        return self.result.outputs


def assign(key: str, cuts: Sequence[float], experiment: str = "ab") -> int:
    """Index of the arm ``key`` falls in, for cumulative weight fractions ``cuts`` (last 1.0)."""
    digest = hashlib.sha256(f"{experiment}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return min(bisect.bisect_right(cuts, u), len(cuts) - 1)


def _cuts(names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> list[float]:
    if weights is None:
        w = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        w = [float(weights.get(n, 0)) for n in names]
    else:
        w = [float(x) for x in weights]
    if len(w) != len(names) or any(x < 0 for x in w) or sum(w) <= 0:
        raise LoradeployError(f"weights {list(w)}: give one non-negative weight per arm ({', '.join(names)}), "
                              "not all zero")
    total, acc, cuts = sum(w), 0.0, []
    for x in w:
        acc += x
        cuts.append(acc / total)
    cuts[-1] = 1.0
    return cuts


class ABRouter:
    """Routes requests to arms of an A/B test on one session.

    ``arms`` maps an arm name to an adapter: a path (loaded and checked by the router, which
    unloads it when the arm is replaced), the name of an adapter already loaded in ``session``,
    or ``None`` for the base alone."""

    def __init__(self, session: Session, arms: Mapping[str, str | Path | None],
                 weights: Sequence[float] | Mapping[str, float] | None = None, experiment: str = "ab"):
        if not arms:
            raise LoradeployError("an A/B test needs at least one arm")
        self.session, self.experiment = session, experiment
        self.names = list(arms)
        self._cuts = _cuts(self.names, weights)
        self._lock = threading.Lock()
        self._stats = {n: _Stats() for n in self.names}
        self._arms: dict[str, _Arm] = {}
        self._generations = dict.fromkeys(self.names, 0)
        for name in self.names:
            self._arms[name] = self._prepare(name, arms[name], 0)

    def _prepare(self, arm: str, adapter: str | Path | None, generation: int) -> _Arm:
        if adapter is None:
            return _Arm(arm, None, None, generation, owned=False)
        if isinstance(adapter, str) and adapter in self.session.adapters:
            return _Arm(arm, adapter, self.session.info(adapter).fingerprint, generation, owned=False)
        if isinstance(adapter, str) and "/" not in adapter and not Path(adapter).exists():  # meant as a name
            have = self.session.adapters
            raise LoradeployError(f"arm {arm!r}: {adapter!r} is no adapter of this artifact (it has "
                                  f"{', '.join(have) if have else 'none'}) and no adapter file or folder"
                                  + did_you_mean(adapter, have))
        name = f"ab.{arm}.{generation}"
        info = self.session.load_adapter(name, Path(adapter))
        return _Arm(arm, name, info.fingerprint, generation, owned=True)

    def assign(self, key: str) -> str:
        """The arm of ``key``: sticky, the same in every process and on every machine."""
        return self.names[assign(str(key), self._cuts, self.experiment)]

    def adapter(self, arm: str) -> str | None:
        """The session adapter name arm ``arm`` serves now."""
        with self._lock:
            return self._arms[arm].adapter

    def run(self, key: str, inputs: Mapping[str, np.ndarray]) -> Routed:
        """Serve one request for ``key`` with its arm's current adapter."""
        return self._serve(key, lambda adapter: self.session.run(inputs, adapter))

    def generate(self, key: str, prompt: str, max_new_tokens: int = 16) -> Routed:
        """Serve one text-generation request for ``key`` (language models): the greedy
        continuation of ``prompt`` with its arm's current adapter."""
        return self._serve(key, lambda adapter: self.session.generate(prompt, adapter, max_new_tokens))

    def _serve(self, key: str, call: Callable[[str | None], Result | Generation]) -> Routed:
        name = self.assign(key)
        with self._lock:
            arm = self._arms[name]
            arm.inflight += 1
        t0 = time.perf_counter()
        result = None
        try:
            result = call(arm.adapter)
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            with self._lock:
                arm.inflight -= 1
                stats = self._stats[name]
                if result is None:
                    stats.errors += 1
                else:
                    stats.add(ms, arm.adapter)
            self._drop_if_done(arm)
        return Routed(name, arm.generation, result, ms)

    def replace_arm(self, arm: str, adapter: str | Path | None) -> dict:
        """Point ``arm`` at ``adapter`` atomically: requests that started keep the old adapter,
        later ones get the new. The new adapter is checked and loaded first; if it is refused
        the arm keeps serving its current adapter and the error is raised."""
        if arm not in self._arms:
            raise LoradeployError(f"no arm {arm!r} (arms: {', '.join(self.names)})")
        with self._lock:
            self._generations[arm] += 1  # reserved here: concurrent replaces load under distinct names
            generation = self._generations[arm]
        new = self._prepare(arm, adapter, generation)
        with self._lock:
            old, self._arms[arm] = self._arms[arm], new
            old.retired = True
        self._drop_if_done(old)
        return self._arm_dict(new)

    def _drop_if_done(self, arm: _Arm) -> None:
        with self._lock:
            if not (arm.retired and arm.owned and arm.inflight == 0):
                return
            arm.owned = False  # unload once
        self.session.unload_adapter(arm.adapter)

    def _arm_dict(self, arm: _Arm) -> dict:
        return {"adapter": arm.adapter, "fingerprint": arm.fingerprint, "generation": arm.generation}

    def snapshot(self) -> dict:
        """Counters and latency histograms per arm, JSON-ready (``json.dumps`` it)."""
        with self._lock:
            weights = [c - p for c, p in zip(self._cuts, [0.0] + self._cuts[:-1])]
            arms = {n: {**self._arm_dict(self._arms[n]), "weight": w, **self._stats[n].to_dict()}
                    for n, w in zip(self.names, weights)}
        return {"experiment": self.experiment, "runtime": self.session.runtime,
                "requests": sum(a["requests"] for a in arms.values()), "arms": arms}
