"""The joint order of a plan search: whole plans along a greedy order of moves that each lower one
module's rank by one or one of its tensors by one format level, the move with the least
predicted error per byte saved first; and the error model behind it (a module's gain: model error
per squared output error; measures in a form that adds up over tensors)."""

from __future__ import annotations

import heapq

from .. import measures
from .formats import stored_bytes
from .plan import allowed_formats, stored_shape, tensor_key


def tensor_bytes(ev, key: str, fmt: str) -> int:
    name, role = key.rsplit(".", 1)
    return stored_bytes(stored_shape(ev.adapters.modules[name], role, ev.storage), fmt)


def _quadratic(measure: str) -> bool:
    """KL and 1 − cosine grow with the square of a small perturbation; |Δlogit| linearly."""
    return measures.get(measure).unit in ("kl", "cosine")


def additive(measure: str, value: float) -> float:
    """The measure in a form that adds up over independent perturbations of several tensors:
    quadratic measures as they are, linear ones (mean |Δlogit|) squared."""
    return value if _quadratic(measure) else value * value



def module_gain(ev, name: str, lowest: dict[str, str], measure: str, base_err: float) -> float:
    """Model error per squared output error of module ``name``: one forward pass with its
    tensors at their lowest formats (``lowest``), with nearest codes. The gain is a property of
    where the module sits, not of the codes, and nearest rounding moves the model well above the
    measure's float noise, where output-aware codes may not (sora-gemma's q4_0 modules, one at a
    time: KL at noise level, so every gain was 0 and the greedy order blind)."""
    ka, kb = tensor_key(name, "lora_A"), tensor_key(name, "lora_B")
    e2e = max(additive(measure, ev.error(lowest, rounding=False)[measure]) - additive(measure, base_err), 0.0)
    layer = ev.layer_error(name, lowest[ka], lowest[kb], rounding=False)
    return e2e / layer ** 2 if layer > 0 else 0.0



def from_additive(measure: str, value: float) -> float:
    return value if _quadratic(measure) else value ** 0.5



class JointOrder:
    """Whole plans along a greedy order of moves that each lower one module's rank by one (SVD
    truncation) or one of its tensors by one format level — the move with the least predicted
    error per byte saved first. A module's predicted error is gain_m · ‖X (ΔW_state − ΔW)ᵀ‖²
    (its output error on its calibration inputs, in the additive form of the measure), gain_m
    from one forward pass with the module's tensors at their lowest formats. A module's state is
    (rank, format of lora_A, format of lora_B)."""

    def __init__(self, ev, ladders, top, base_err, measure, step):
        self.ev, self.measure, self.storage = ev, measure, ev.storage
        self.names = sorted(ev.adapters.modules)
        self.gain, self.sens, self.nbytes = {}, {}, {}
        for i, name in enumerate(self.names):
            ka, kb = tensor_key(name, "lora_A"), tensor_key(name, "lora_B")
            low_a, low_b = ladders[ka][-1], ladders[kb][-1]
            g = self.gain[name] = module_gain(ev, name, {**top, ka: low_a, kb: low_b}, measure, base_err)
            self.sens[ka] = {f: g * ev.layer_error(name, f, top[kb]) ** 2 for f in ladders[ka]}
            self.sens[kb] = {f: g * ev.layer_error(name, top[ka], f) ** 2 for f in ladders[kb]}
            self.nbytes[ka] = {f: tensor_bytes(ev, ka, f) for f in ladders[ka]}
            self.nbytes[kb] = {f: tensor_bytes(ev, kb, f) for f in ladders[kb]}
            if i % 8 == 7:
                step(f"sensitivity {i + 1}/{len(self.names)} modules")
        self.top = {n: (ev.adapters.modules[n].rank, top[tensor_key(n, "lora_A")], top[tensor_key(n, "lora_B")])
                    for n in self.names}
        self._size: dict[tuple, int] = {}
        self._err: dict[tuple, float] = {}

    def _ladder(self, name, role, k):
        return allowed_formats(self.ev.module_at(name, k), role, self.storage)

    def size(self, name, state) -> int:
        if (name, state) not in self._size:
            k, fa, fb = state
            m = self.ev.module_at(name, k)
            self._size[(name, state)] = sum(stored_bytes(stored_shape(m, r, self.storage), f)
                                            for r, f in (("lora_A", fa), ("lora_B", fb)))
        return self._size[(name, state)]

    def err(self, name, state) -> float:
        if (name, state) not in self._err:
            k, fa, fb = state
            self._err[(name, state)] = self.gain[name] * self.ev.layer_error(name, fa, fb, k) ** 2
        return self._err[(name, state)]

    def _fit(self, fmt, ladder):
        """``fmt`` if the ladder has it, else the nearest higher precision it has."""
        full = self.storage.ladder
        return fmt if fmt in ladder else [f for f in ladder if full.index(f) <= full.index(fmt)][-1]

    def moves(self, name, state):
        k, fa, fb = state
        lad_a, lad_b = self._ladder(name, "lora_A", k), self._ladder(name, "lora_B", k)
        out = []
        if lad_a.index(fa) + 1 < len(lad_a):
            out.append((k, lad_a[lad_a.index(fa) + 1], fb))
        if lad_b.index(fb) + 1 < len(lad_b):
            out.append((k, fa, lad_b[lad_b.index(fb) + 1]))
        lower = [k - 1] if k > 1 else []
        if k > 32 and k % 32:  # the nearest rank whose lora_b rows are whole 32-blocks (GGML types)
            lower.append(k - k % 32)
        for k2 in lower:
            out.append((k2, self._fit(fa, self._ladder(name, "lora_A", k2)),
                        self._fit(fb, self._ladder(name, "lora_B", k2))))
        return out

    def plan_of(self, state: dict) -> tuple[dict[str, str], dict[str, int]]:
        """(formats per tensor, ranks of the truncated modules) of module states."""
        formats, rank_of = {}, {}
        for n in self.names:
            k, fa, fb = state[n]
            formats[tensor_key(n, "lora_A")], formats[tensor_key(n, "lora_B")] = fa, fb
            if k < self.ev.adapters.modules[n].rank:
                rank_of[n] = k
        return formats, rank_of

    def state_of(self, plan) -> dict:
        formats, rank_of = plan[0], plan[1]
        return {n: (rank_of.get(n, self.ev.adapters.modules[n].rank), formats[tensor_key(n, "lora_A")],
                    formats[tensor_key(n, "lora_B")]) for n in self.names}

    def plans(self, start: dict | None = None, banned: frozenset | set = frozenset()):
        """Plans along the order from ``start`` (the highest precision when None), leaving out
        the moves in ``banned``: (formats, ranks, bytes, predicted measure, move) per prefix, the
        move (module, state before, state after) that led to it (None for the first)."""
        state = dict(start or self.top)
        version = {n: 0 for n in self.names}
        heap = []

        def push(name):
            here_e, here_b = self.err(name, state[name]), self.size(name, state[name])
            best = None
            for nxt in self.moves(name, state[name]):
                saved = here_b - self.size(name, nxt)
                if saved <= 0 or (name, state[name], nxt) in banned:
                    continue
                ratio = max(self.err(name, nxt) - here_e, 0.0) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, nxt)
            if best is not None:
                heapq.heappush(heap, (best[0], name, version[name], best[1]))

        def snapshot(move):
            formats, rank_of = self.plan_of(state)
            total = sum(self.size(n, state[n]) for n in self.names)
            return formats, rank_of, total, from_additive(self.measure, sum(self.err(n, state[n]) for n in self.names)), move

        for n in self.names:
            push(n)
        plans = [snapshot(None)]
        while heap:
            _, name, ver, nxt = heapq.heappop(heap)
            if ver != version[name]:
                continue
            move = (name, state[name], nxt)
            state[name] = nxt
            version[name] += 1
            plans.append(snapshot(move))
            push(name)
        return plans
