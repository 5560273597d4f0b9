"""The plan search: per-tensor sensitivity on calibration inputs, a greedy order of
precision drops by sensitivity per byte saved, and an end-to-end check of whole plans that
backs off (binary search over the greedy order) until the plan meets the fidelity budget.

Error measures (all against the pruned adapter in fp32, which equals the trained adapter):
classifier ``mean_abs_logit`` (mean |Δlogit|), embeddings ``cosine_distance`` (1 − mean
cosine), language model ``kl_mean`` (mean per-token KL(reference ‖ plan)).
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import measures, registry
from ..errors import LoradeployError
from ..ir import AdapterSet, Task
from ..merge import find_module, load_extras
from .plan import ROLES, allowed_formats, quantize_adapter, stored_matrix, tensor_key

#: the measure a plan is held to, per task (names from the one table of measures)
MEASURES = {Task.SEQUENCE_CLASSIFICATION: "mean_abs_logit", Task.FEATURE_EXTRACTION: "cosine_distance",
            Task.CAUSAL_LM: "kl_mean"}
#: default fidelity budget of the adapter's quantization alone (the target's budget covers the
#: whole artifact, base quantization and runtime included)
DEFAULT_BUDGETS = {"mean_abs_logit": 0.01, "cosine_distance": 1e-4, "kl_mean": 0.002}
#: further constraints a plan is held to by default (measure → minimum), per task: a language
#: model's top-1 token may flip at near-ties even when KL is tiny, and the targets budget top-1
DEFAULT_FLOORS = {Task.CAUSAL_LM: {"top1_agreement": 0.98}, Task.SEQUENCE_CLASSIFICATION: {"label_agreement": 0.995}}

Progress = Callable[[str], None]


class Evaluator:
    """The base with the adapter merged, re-merging only the modules a plan changes. Outputs
    on fixed calibration inputs, compared with the fp32 adapter's."""

    def __init__(self, base_model, adapters: AdapterSet, runtime: str, task: Task, batches: list[dict]):
        self.adapters, self.runtime, self.task, self.batches = adapters, runtime, task, batches
        self.storage = registry.get(runtime).storage
        self.model = copy.deepcopy(base_model).eval()
        load_extras(self.model, adapters)
        self.weights, self.base_weights = {}, {}
        for name in adapters.modules:
            _, module = find_module(self.model, name)
            self.weights[name] = module.weight
            self.base_weights[name] = module.weight.detach().clone()
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._current: dict[str, tuple[str, str]] = {}  # module → formats its weight holds now
        self.evaluations = 0
        exact = {tensor_key(n, r): self.storage.ladder[0] for n in adapters.modules for r in ROLES}
        self._set(exact)
        self.inputs: dict[str, torch.Tensor] = {}
        hooks = [find_module(self.model, name)[1].register_forward_pre_hook(self._capture(name))
                 for name in adapters.modules]
        try:
            self.reference = self._outputs()
        finally:
            for h in hooks:
                h.remove()

    def _capture(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            mask = self._mask.reshape(-1).bool() if self._mask is not None and self._mask.numel() == x.shape[0] else None
            x = x[mask] if mask is not None else x
            self.inputs[name] = torch.cat([self.inputs[name], x.double()]) if name in self.inputs else x.double()
        return hook

    @torch.no_grad()
    def layer_error(self, name: str, fmt_a: str, fmt_b: str) -> float:
        """||X·(ΔW_plan − ΔW)ᵀ||_F on the module's calibration inputs X: the error that module's
        output takes when its tensors are stored in (fmt_a, fmt_b)."""
        top = self.storage.ladder[0]
        scale = self._unfolded_scale(name)

        def delta(fa, fb):
            return scale * (self._dequantized(name, "lora_B", fb) @ self._dequantized(name, "lora_A", fa))

        diff = delta(fmt_a, fmt_b) - delta(top, top)
        return float(torch.linalg.norm(self.inputs[name] @ diff.T))

    def _dequantized(self, name: str, role: str, fmt: str) -> torch.Tensor:
        key = (tensor_key(name, role), fmt)
        if key not in self._cache:
            single = AdapterSet(self.adapters.method, {name: self.adapters.modules[name]})
            q = quantize_adapter(single, self.runtime, {tensor_key(name, r): fmt if r == role else self.storage.ladder[0]
                                                        for r in ROLES})
            self._cache[key] = getattr(q.simulated.modules[name], role).to(torch.float64)
        return self._cache[key]

    @torch.no_grad()
    def _set(self, formats: dict[str, str]) -> None:
        for name, m in self.adapters.modules.items():
            pair = (formats[tensor_key(name, "lora_A")], formats[tensor_key(name, "lora_B")])
            if self._current.get(name) == pair:
                continue
            self._current[name] = pair
            a = self._dequantized(name, "lora_A", pair[0])
            b = self._dequantized(name, "lora_B", pair[1])
            scale = self._unfolded_scale(name)
            w = self.weights[name]
            w.copy_((self.base_weights[name].to(torch.float64) + scale * (b @ a)).to(w.dtype))

    def _unfolded_scale(self, name: str) -> float:
        """The scale the stored B still needs: 1 where the runtime folds it into B."""
        return 1.0 if self.storage.folds_scale else self.adapters.modules[name].scale

    _mask: torch.Tensor | None = None

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        outs = []
        for batch in self.batches:
            self._mask = batch["attention_mask"]
            out = self.model(**batch)
            if self.task is Task.CAUSAL_LM:
                outs.append(torch.log_softmax(out.logits.float(), -1)[batch["attention_mask"].bool()])
            elif self.task is Task.SEQUENCE_CLASSIFICATION:
                outs.append(out.logits.double())
            else:
                m = batch["attention_mask"].unsqueeze(-1).float()
                outs.append(((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).double())
        return outs

    def error(self, formats: dict[str, str]) -> dict:
        """Error measures of a whole plan (every tensor's format given)."""
        self._set(formats)
        self.evaluations += 1
        got = self._outputs()
        return compare(self.reference, got, self.task)


def compare(reference: list[torch.Tensor], got: list[torch.Tensor], task: Task) -> dict:
    if task is Task.CAUSAL_LM:
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(reference, got)])
        top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, got)])
        return {"kl_mean": float(kl.mean()), "top1_agreement": float(top1.mean())}
    ref, out = torch.cat(reference), torch.cat(got)
    if task is Task.SEQUENCE_CLASSIFICATION:
        d = (out - ref).abs()
        return {"mean_abs_logit": float(d.mean()), "max_abs_logit": float(d.max()),
                "label_agreement": float((out.argmax(-1) == ref.argmax(-1)).double().mean())}
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    return {"cosine_distance": float(1 - cos.mean()), "cosine_min": float(cos.min())}


def calibration_batches(tokenizer, texts: list[str], task: Task, max_length: int, batch_size: int = 32) -> list[dict]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@dataclass
class SearchResult:
    formats: dict[str, str]
    measured: dict
    nbytes: int
    sensitivity: dict[str, dict[str, float]]
    tensor_bytes: dict[str, dict[str, int]]
    curve: list[dict] = field(default_factory=list)  # whole plans checked end to end
    predicted: float = 0.0
    start: dict | None = None  # B-LoRA's learned bit widths as a plan, measured
    chosen_from: str = "search"


def _bytes(ev: Evaluator, key: str, fmt: str) -> int:
    name, role = key.rsplit(".", 1)
    m = ev.adapters.modules[name]
    from .formats import quantize

    return quantize(stored_matrix(m, role, ev.storage), fmt).nbytes


def _quadratic(measure: str) -> bool:
    """KL and 1 − cosine grow with the square of a small perturbation; |Δlogit| linearly."""
    return measures.get(measure).unit in ("kl", "cosine")


def additive(measure: str, value: float) -> float:
    """The measure in a form that adds up over independent perturbations of several tensors:
    quadratic measures as they are, linear ones (mean |Δlogit|) squared."""
    return value if _quadratic(measure) else value * value


def _model_sensitivity(ev, ladders, top, base_err, measure, step) -> dict[str, dict[str, float]]:
    """Every tensor at every lower format alone, measured on the model's outputs (one forward
    pass each: exact, slow for large models)."""
    sens = {}
    for i, (key, ladder) in enumerate(sorted(ladders.items())):
        sens[key] = {ladder[0]: 0.0}
        for fmt in ladder[1:]:
            sens[key][fmt] = max(additive(measure, ev.error({**top, key: fmt})[measure]) - additive(measure, base_err), 0.0)
        if i % 8 == 7:
            step(f"sensitivity {i + 1}/{len(ladders)} tensors")
    return sens


def _layer_sensitivity(ev, ladders, top, base_err, measure, step) -> dict[str, dict[str, float]]:
    """Each module's output error on its calibration inputs per format, converted to the model's
    output measure by one forward pass per module (both its tensors at their lowest format):
    sensitivity = gain_m · layer_error², in the additive form of the measure."""
    p = 2
    top_fmt = ev.storage.ladder[0]
    sens = {}
    for i, name in enumerate(sorted(ev.adapters.modules)):
        ka, kb = tensor_key(name, "lora_A"), tensor_key(name, "lora_B")
        low_a, low_b = ladders[ka][-1], ladders[kb][-1]
        e2e = max(additive(measure, ev.error({**top, ka: low_a, kb: low_b})[measure]) - additive(measure, base_err), 0.0)
        layer = ev.layer_error(name, low_a, low_b)
        gain = e2e / layer ** p if layer > 0 else 0.0
        sens[ka] = {f: gain * ev.layer_error(name, f, top_fmt) ** p for f in ladders[ka]}
        sens[kb] = {f: gain * ev.layer_error(name, top_fmt, f) ** p for f in ladders[kb]}
        if i % 8 == 7:
            step(f"sensitivity {i + 1}/{len(ev.adapters.modules)} modules")
    return sens


def _from_additive(measure: str, value: float) -> float:
    return value if _quadratic(measure) else value ** 0.5


def search(ev: Evaluator, budget: float | None = None, max_bytes: int | None = None,
           start: dict[str, str] | None = None, progress: Progress | None = None,
           sensitivity: str = "layer", floors: dict[str, float] | None = None) -> SearchResult:
    """Minimise bytes with ``measure ≤ budget`` (or minimise error with ``bytes ≤ max_bytes``).
    ``sensitivity``: ``layer`` (module output error, scaled to the model's by one forward pass
    per module) or ``model`` (one forward pass per tensor and format)."""
    step = progress or (lambda _m: None)
    measure = MEASURES[ev.task]
    ladders = {tensor_key(n, r): allowed_formats(m, r, ev.storage) for n, m in ev.adapters.modules.items() for r in ROLES}
    top = {k: lad[0] for k, lad in ladders.items()}
    base_err = ev.error(top)[measure]
    sens = (_model_sensitivity if sensitivity == "model" else _layer_sensitivity)(ev, ladders, top, base_err, measure, step)
    nbytes: dict[str, dict[str, int]] = {key: {f: _bytes(ev, key, f) for f in ladder} for key, ladder in ladders.items()}

    # greedy order: every drop of one tensor by one level, cheapest error per byte saved first
    level = {k: 0 for k in ladders}
    heap = []

    def push(key):
        i = level[key]
        lad = ladders[key]
        if i + 1 < len(lad):
            d_err = sens[key][lad[i + 1]] - sens[key][lad[i]]
            d_bytes = nbytes[key][lad[i]] - nbytes[key][lad[i + 1]]
            heapq.heappush(heap, (max(d_err, 0.0) / max(d_bytes, 1), key, i + 1))

    for k in sorted(ladders):
        push(k)
    moves = []
    while heap:
        _, key, nxt = heapq.heappop(heap)
        level[key] = nxt
        moves.append((key, ladders[key][nxt]))
        push(key)

    def plan_at(n: int) -> dict[str, str]:
        formats = dict(top)
        for key, fmt in moves[:n]:
            formats[key] = fmt
        return formats

    bytes_at = [sum(nbytes[k][f] for k, f in plan_at(n).items()) for n in range(len(moves) + 1)]
    curve: list[dict] = []

    def check(n: int) -> dict:
        got = ev.error(plan_at(n))
        predicted = _from_additive(measure, sum(sens[k][f] for k, f in plan_at(n).items()))
        curve.append({"moves": n, "bytes": bytes_at[n], **got, "predicted": predicted})
        step(f"checked a plan of {bytes_at[n]:,} bytes: {measure} {got[measure]:.4g}")
        return got

    if max_bytes is not None:
        n = next((i for i, b in enumerate(bytes_at) if b <= max_bytes), None)
        if n is None:
            raise LoradeployError(f"no plan fits in {max_bytes:,} bytes (the smallest is {bytes_at[-1]:,})")
        measured = check(n)
    else:
        lo, hi = 0, len(moves)
        first = check(0)
        floors = DEFAULT_FLOORS.get(ev.task, {}) if floors is None else floors

        def meets(got: dict) -> bool:
            return got[measure] <= budget and all(got.get(k, v) >= v for k, v in floors.items())

        if not meets(first):
            raise LoradeployError(f"even the highest precision misses the budget: {measure} {first[measure]:.4g} > {budget}")
        measured_at = {0: first}
        while lo < hi:  # largest prefix whose whole plan meets the budget
            mid = (lo + hi + 1) // 2
            measured_at[mid] = check(mid)
            if meets(measured_at[mid]):
                lo = mid
            else:
                hi = mid - 1
        n, measured = lo, measured_at[lo]
    result = SearchResult(plan_at(n), measured, bytes_at[n], sens, nbytes, curve,
                          _from_additive(measure, sum(sens[k][f] for k, f in plan_at(n).items())))
    # whole plans outside the greedy order, measured the same way: B-LoRA's bit hints (the
    # starting plan) and each uniform level (the additive model can misjudge how errors of many
    # tensors combine; these keep the result no worse than either at its bytes)
    candidates = []
    if start is not None:
        candidates.append(("blora-bit-hints", dict(start)))
    for level, fmt in enumerate(ev.storage.ladder):
        candidates.append((f"uniform {fmt}", {k: lad[min(level, len(lad) - 1)] if fmt not in lad else fmt
                                              for k, lad in ladders.items()}))
    for label, formats in candidates:
        got = ev.error(formats)
        size = sum(nbytes[k][f] for k, f in formats.items())
        if label == "blora-bit-hints":
            result.start = {"formats": formats, "bytes": size, **got}
        fits = meets(got) if max_bytes is None else size <= max_bytes
        better = (size, got[measure]) < (result.nbytes, result.measured[measure]) if max_bytes is None \
            else (got[measure], size) < (result.measured[measure], result.nbytes)
        if fits and better:
            result.formats, result.measured, result.nbytes, result.chosen_from = formats, got, size, label
    return result
