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

import numpy as np
import torch

from .. import measures, registry
from ..errors import LoradeployError
from ..ir import AdapterSet, LoraModule, Task
from ..merge import find_module, load_extras
from ..progress import Progress
from .plan import ROLES, allowed_formats, quantize_adapter, stored_shape, tensor_key
from .rank import decompose, truncate
from .formats import ROW_WISE, round_activations, stored_bytes
from .rounding import ROUNDED_FORMATS

#: the measure a plan is held to, per task (names from the one table of measures)
MEASURES = {Task.SEQUENCE_CLASSIFICATION: "mean_abs_logit", Task.FEATURE_EXTRACTION: "cosine_distance",
            Task.CAUSAL_LM: "kl_mean"}
#: default fidelity budget of the adapter's quantization alone (the target's budget covers the
#: whole artifact, base quantization and runtime included)
DEFAULT_BUDGETS = {"mean_abs_logit": 0.01, "cosine_distance": 1e-4, "kl_mean": 0.002}
#: further constraints a plan is held to by default (measure → minimum), per task: a language
#: model's top-1 token may flip at near-ties even when KL is tiny, and the targets budget top-1
DEFAULT_FLOORS = {Task.CAUSAL_LM: {"top1_agreement": 0.98}, Task.SEQUENCE_CLASSIFICATION: {"label_agreement": 0.995}}

#: outputs kept per block and batch (:meth:`Evaluator._kept`): the plans along a search differ in a
#: module or two from the last accepted one, whose outputs are among the last few used (one for a
#: held-out evaluator, whose few plans differ in many modules, on many more texts)
KEPT_OUTPUTS = 4


class Evaluator:
    """The base with the adapter merged, re-merging only the modules a plan changes. Outputs
    on fixed calibration inputs, compared with the fp32 adapter's. ``rounding``: integer
    formats store the codes output-aware rounding chooses against each module's calibration
    inputs (:mod:`.rounding`), else the nearest ones. ``codes_from``: another evaluator whose
    stored tensors (codes and truncations, chosen on its calibration inputs) this one measures
    on its own inputs, e.g. held-out texts the plan was not fitted to."""

    def __init__(self, base_model, adapters: AdapterSet, runtime: str, task: Task, batches: list[dict],
                 rounding: bool = True, truncation: str = "output-aware", codes_from: "Evaluator | None" = None):
        self.adapters, self.runtime, self.task, self.batches = adapters, runtime, task, batches
        self.codes_from = codes_from
        self.rounding = rounding if codes_from is None else codes_from.rounding
        #: how modules are truncated to a lower rank: "output-aware" (SVD of ΔW·L, L Lᵀ = XᵀX + λI)
        #: or "plain" (SVD of ΔW, as PEFT's conversion does)
        self.truncation = truncation if codes_from is None else codes_from.truncation
        self._grams: dict[str, np.ndarray] = {}
        # the blocks whose outputs are kept (:meth:`_cache_blocks`; none until the reference ran)
        self._blocks: list = []
        self._block_of: dict[str, int] = {}  # module → index of its block (0: before them, len: after)
        # (batch, block) → {what the modules up to that block hold: that block's output}, the last KEPT_OUTPUTS
        self._block_out: dict[tuple[int, int], dict[tuple, object]] = {}
        self._prefix: list[tuple] = []  # per block: the states of the modules up to it, for the plan running now
        self._batch = 0  # the calibration batch running now
        self._keep = 1 if codes_from is not None else KEPT_OUTPUTS
        self.storage = registry.get(runtime).storage
        self.model = copy.deepcopy(base_model).eval()
        load_extras(self.model, adapters)
        self.weights, self.base_weights = {}, {}
        for name in adapters.modules:
            _, module = find_module(self.model, name)
            self.weights[name] = module.weight
            self.base_weights[name] = module.weight.detach().clone()
        self._cache: dict[tuple[str, str, int], torch.Tensor] = {}
        self._current: dict[str, tuple] = {}  # module → (formats, rank, rounding, truncation) its weight holds now
        self._truncated: dict[tuple[str, int, str], LoraModule] = {}
        self._decomposed: dict[tuple[str, str], tuple] = {}
        self.evaluations = 0
        #: a runtime that rounds a product's input by the weight's format (llama.cpp) cannot be
        #: simulated by merged weights: each module then adds its LoRA path beside the base
        #: weight, its inputs rounded as the runtime rounds them, in float64
        self.unmerged = bool(self.storage.activations)
        self._paths: dict[str, tuple] = {}
        self._rounded_inputs: dict[tuple[str, str | None], torch.Tensor] = {}
        if self.unmerged:
            for name in adapters.modules:
                find_module(self.model, name)[1].register_forward_hook(self._lora_path(name))
        if task is Task.CAUSAL_LM:  # the head only on the tokens compared (not on padding):
            # Gemma 3's 262,144-row head on every padded position was half of each forward
            self.model.get_output_embeddings().register_forward_pre_hook(self._unpadded)
        exact = {tensor_key(n, r): self.storage.ladder[0] for n in adapters.modules for r in ROLES}
        self._set(exact)
        self.inputs: dict[str, torch.Tensor] = {}
        hooks = [find_module(self.model, name)[1].register_forward_pre_hook(self._capture(name))
                 for name in adapters.modules] if codes_from is None else []  # (its codes come from elsewhere)
        try:
            self.reference = self._outputs()
        finally:
            for h in hooks:
                h.remove()
        self._cache_blocks()

    # --- outputs of the model's blocks kept between plans -----------------------------------
    #: a block's output is kept under the states of the modules up to it (and the batch): a plan
    #: whose modules up to block j hold what they held in a plan measured before reuses blocks
    #: ..j (the embeddings are recomputed). Keyed by state, not by "what changed since the last
    #: plan": a rejected move measured and undone costs nothing before the next move's block

    def _cache_blocks(self) -> None:
        lists = [m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
        if not lists:
            return
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        inside = {id(sub): i for i, block in enumerate(blocks) for sub in block.modules()}
        self._blocks = list(blocks)
        # a module outside the blocks is either before them (invalidates all) or after (none)
        after = len(blocks)
        order = {id(m): i for i, m in enumerate(self.model.modules())}
        first_block = order[id(blocks[0])]
        for name in self.adapters.modules:
            mod = find_module(self.model, name)[1]
            self._block_of[name] = inside.get(id(mod), 0 if order[id(mod)] < first_block else after)
        for i, block in enumerate(self._blocks):
            block.forward = self._kept(i, block.forward)

    def _kept(self, i: int, forward):
        def run(*args, **kwargs):
            kept = self._block_out.setdefault((self._batch, i), {})
            state = self._prefix[i] if self._prefix else None
            if state in kept:
                kept[state] = kept.pop(state)  # the most recently used last
                return kept[state]
            out = forward(*args, **kwargs)
            if state is not None:
                if len(kept) >= self._keep:
                    del kept[next(iter(kept))]  # the least recently used
                kept[state] = out
            return out
        return run

    def _capture(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            mask = self._mask.reshape(-1).bool() if self._mask is not None and self._mask.numel() == x.shape[0] else None
            x = x[mask] if mask is not None else x
            self.inputs[name] = torch.cat([self.inputs[name], x.double()]) if name in self.inputs else x.double()
        return hook

    def _unpadded(self, _module, args):
        return (args[0][self._mask.bool()],) + tuple(args[1:])

    def _lora_path(self, name: str):
        def hook(_module, args, out):
            a, b, how_a, how_b = self._paths[name]
            x = round_activations(args[0].to(torch.float64), how_a)
            return out + (round_activations(x @ a.T, how_b) @ b.T).to(out.dtype)
        return hook

    def _activation(self, fmt: str) -> str | None:
        return self.storage.activations.get(fmt)

    def _rank_outputs(self, name: str, a: torch.Tensor, fmt_a: str, fmt_b: str) -> torch.Tensor:
        """The calibration inputs through a module's stored ``A`` as the runtime computes them:
        inputs rounded for ``fmt_a``, the product rounded for ``fmt_b`` (``B``'s input)."""
        how = self._activation(fmt_a)
        if (name, how) not in self._rounded_inputs:
            self._rounded_inputs[(name, how)] = round_activations(self.inputs[name], how)
        return round_activations(self._rounded_inputs[(name, how)] @ a.T, self._activation(fmt_b))

    def gram(self, name: str):
        """XᵀX (float64 numpy) of module ``name``'s calibration inputs."""
        if name not in self._grams:
            x = self.inputs[name]
            self._grams[name] = (x.T @ x).numpy()
        return self._grams[name]

    def module_at(self, name: str, rank: int | None = None) -> LoraModule:
        """Module ``name`` at ``rank`` (its pruned rank when None; lower: the SVD truncation,
        output-aware or plain as ``self.truncation`` says)."""
        if self.codes_from is not None:
            return self.codes_from.module_at(name, rank)
        m = self.adapters.modules[name]
        k = m.rank if rank is None else rank
        key = (name, k, self.truncation)
        if key not in self._truncated:
            if k >= m.rank:
                self._truncated[key] = m
            else:
                if (name, self.truncation) not in self._decomposed:  # one SVD per module, cut at each rank
                    gram = self.gram(name) if self.truncation == "output-aware" else None
                    self._decomposed[(name, self.truncation)] = decompose(m, gram)
                self._truncated[key] = truncate(m, k, parts=self._decomposed[(name, self.truncation)])
        return self._truncated[key]

    @torch.no_grad()
    def layer_error(self, name: str, fmt_a: str, fmt_b: str, rank: int | None = None,
                    rounding: bool | None = None) -> float:
        """||X·(ΔW_plan − ΔW)ᵀ||_F on the module's calibration inputs X: the error that module's
        output takes when its tensors are stored in (fmt_a, fmt_b), at ``rank`` (``rounding``:
        output-aware or nearest codes, the evaluator's own when None)."""
        top = self.storage.ladder[0]
        full = self.adapters.modules[name].rank
        k = full if rank is None else rank
        # ΔW_plan − ΔW = L·R of rank ≤ k + r: ‖X (L R)ᵀ‖² = Σ (Y LᵀL) ⊙ Y with Y = X Rᵀ, never
        # forming the [out, in] difference (cheap for wide layers and many candidates)
        # (inputs rounded as the runtime rounds them: Y holds the rank outputs both sides)
        left = torch.cat([self._unfolded_scale(name, k) * self._dequantized(name, "lora_B", fmt_b, k, rounding),
                          -self._unfolded_scale(name, full) * self._dequantized(name, "lora_B", top, full)], dim=1)
        y = torch.cat([self._rank_outputs(name, self._dequantized(name, "lora_A", fmt_a, k, rounding), fmt_a, fmt_b),
                       self._rank_outputs(name, self._dequantized(name, "lora_A", top, full), top, top)], dim=1)
        return float(((y @ (left.T @ left)) * y).sum().clamp(min=0.0).sqrt())

    def _dequantized(self, name: str, role: str, fmt: str, rank: int | None = None,
                     rounding: bool | None = None) -> torch.Tensor:
        if self.codes_from is not None:
            return self.codes_from._dequantized(name, role, fmt, rank, rounding)
        module = self.module_at(name, rank)
        below = self.adapters.modules[name].rank - 1  # the highest truncated rank
        if role == "lora_A" and module.rank < below and fmt in ROW_WISE:
            # a truncation's A is the first k rows of the decomposition's (√Σ_k R_k, :func:`.rank.truncate`),
            # and these formats quantize rows each on its own: one quantization per module and format
            return self._dequantized(name, role, fmt, below, rounding)[:module.rank]
        rounded = (self.rounding if rounding is None else rounding) and fmt in ROUNDED_FORMATS
        key = (tensor_key(name, role), fmt, module.rank, rounded, self.truncation)
        if key not in self._cache:
            single = AdapterSet(self.adapters.method, {name: module})
            q = quantize_adapter(single, self.runtime, {tensor_key(name, r): fmt if r == role else self.storage.ladder[0]
                                                        for r in ROLES}, grams={name: self.gram(name)} if rounded else None)
            self._cache[key] = getattr(q.simulated.modules[name], role).to(torch.float64)
        return self._cache[key]

    @torch.no_grad()
    def _set(self, formats: dict[str, str], ranks: dict[str, int] | None = None, rounding: bool | None = None) -> None:
        rounding = self.rounding if rounding is None else rounding
        for name, m in self.adapters.modules.items():
            k = (ranks or {}).get(name, m.rank)
            state = (formats[tensor_key(name, "lora_A")], formats[tensor_key(name, "lora_B")], k, rounding,
                     self.truncation)
            if self._current.get(name) == state:
                continue
            self._current[name] = state
            a = self._dequantized(name, "lora_A", state[0], k, rounding)
            b = self._dequantized(name, "lora_B", state[1], k, rounding)
            if self.unmerged:
                self._paths[name] = (a, self._unfolded_scale(name, k) * b, self._activation(state[0]),
                                     self._activation(state[1]))
                continue
            w = self.weights[name]
            w.copy_((self.base_weights[name].to(torch.float64) + self._unfolded_scale(name, k) * (b @ a)).to(w.dtype))

    def _unfolded_scale(self, name: str, rank: int | None = None) -> float:
        """The scale the stored B still needs: 1 where the runtime folds it into B."""
        return 1.0 if self.storage.folds_scale else self.module_at(name, rank).scale

    _mask: torch.Tensor | None = None
    _lm_reference: "LmReference | None" = None

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        outs = []
        if self._blocks:
            states = sorted((self._block_of[n], n, self._current[n]) for n in self.adapters.modules)
            self._prefix = [tuple(s for s in states if s[0] <= i) for i in range(len(self._blocks))]
        for i, batch in enumerate(self.batches):
            self._mask, self._batch = batch["attention_mask"], i
            out = self.model(**batch)
            if self.task is Task.CAUSAL_LM:
                outs.append(out.logits.float())  # [unpadded tokens, vocab]: see _unpadded
            elif self.task is Task.SEQUENCE_CLASSIFICATION:
                outs.append(out.logits.double())
            else:
                m = batch["attention_mask"].unsqueeze(-1).float()
                outs.append(((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).double())
        return outs

    def outputs(self, formats: dict[str, str], ranks: dict[str, int] | None = None,
                rounding: bool | None = None) -> list[torch.Tensor]:
        """The model's outputs on the calibration batches with the adapter stored as a plan says
        (LM: logits of the unmasked tokens)."""
        self._set(formats, ranks, rounding)
        return self._outputs()

    def error(self, formats: dict[str, str], ranks: dict[str, int] | None = None, rounding: bool | None = None) -> dict:
        """Error measures of a whole plan (every tensor's format given; ``ranks``: modules
        truncated to a lower rank; ``rounding``: output-aware or nearest, the evaluator's own
        when None)."""
        self._set(formats, ranks, rounding)
        self.evaluations += 1
        got = self._outputs()
        if self.task is Task.CAUSAL_LM:
            if self._lm_reference is None:
                self._lm_reference = LmReference(self.reference)
            return self._lm_reference.compare(got)
        return compare(self.reference, got, self.task)


def compare(reference: list[torch.Tensor], got: list[torch.Tensor], task: Task) -> dict:
    if task is Task.CAUSAL_LM:
        return _lm_compare(reference, got)
    ref, out = torch.cat(reference), torch.cat(got)
    if task is Task.SEQUENCE_CLASSIFICATION:
        d = (out - ref).abs()
        return {"mean_abs_logit": float(d.mean()), "max_abs_logit": float(d.max()),
                "label_agreement": float((out.argmax(-1) == ref.argmax(-1)).double().mean())}
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    return {"cosine_distance": float(1 - cos.mean()), "cosine_min": float(cos.min())}


def _lm_compare(reference: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Per-token KL(reference ‖ got) from logits [tokens, vocab], in float64 from the logit
    differences δ = got − reference: KL = log E_p[e^δ] − E_p[δ], p the reference's softmax.
    Log-probs in float32 would not do: their rounding alone (~1e-6 at −20) averages to a KL of
    ~1e-8, the size of an 8-bit plan's error."""
    kl, top1 = [], []
    for r, g in zip(reference, got):
        for i in range(0, r.shape[0], 64):
            p = torch.softmax(r[i:i + 64].double(), -1)
            d = g[i:i + 64].double() - r[i:i + 64].double()
            kl.append(torch.log1p((p * torch.expm1(d)).sum(-1)) - (p * d).sum(-1))
        top1.append((r.argmax(-1) == g.argmax(-1)).double())
    return {"kl_mean": float(torch.cat(kl).mean()), "top1_agreement": float(torch.cat(top1).mean())}


class LmReference:
    """The reference logits of a plan search, kept for the many comparisons against them: per
    token only the vocabulary entries whose reference probability exceeds ``floor`` (Gemma 3 on
    its calibration texts: ~19% of 262,144 at 1e-12, the rest holding < 3e-8 of the mass), the
    KL computed as in :func:`_lm_compare` over them, renormalized (off from the full sum by
    about the mass left out, relatively)."""

    def __init__(self, reference: list[torch.Tensor], floor: float = 1e-12):
        self.reference = reference
        self.parts = []
        for r in reference:
            for i in range(0, r.shape[0], 64):
                p = torch.softmax(r[i:i + 64].double(), -1)
                rows, cols = torch.nonzero(p > floor, as_tuple=True)
                flat = rows * r.shape[1] + cols
                kept = p[rows, cols]
                total = torch.zeros(p.shape[0], dtype=torch.float64).index_add_(0, rows, kept)
                self.parts.append((flat, rows, kept / total[rows], r[i:i + 64].reshape(-1)[flat].double()))

    def compare(self, got: list[torch.Tensor]) -> dict:
        kl, top1, k = [], [], 0
        for r, g in zip(self.reference, got):
            for i in range(0, r.shape[0], 64):
                flat, rows, p, ref = self.parts[k]
                k += 1
                d = g[i:i + 64].reshape(-1)[flat].double() - ref
                n = min(64, r.shape[0] - i)
                e1 = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, p * torch.expm1(d))
                e0 = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, p * d)
                kl.append(torch.log1p(e1) - e0)
            top1.append((r.argmax(-1) == g.argmax(-1)).double())
        return {"kl_mean": float(torch.cat(kl).mean()), "top1_agreement": float(torch.cat(top1).mean())}


def calibration_batches(tokenizer, texts: list[str], task: Task, max_length: int, batch_size: int = 32) -> list[dict]:
    """The texts tokenized in batches of ``batch_size``, in :func:`~loradeploy.evaldata.length_order`
    (outputs compared between plans come in this order on both sides; no measure depends on it)."""
    from ..evaldata import length_order

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    order = length_order(tokenizer, texts, max_length)
    out = []
    for i in range(0, len(order), batch_size):
        enc = tokenizer([texts[j] for j in order[i:i + batch_size]], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
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
    ranks: dict[str, int] | None = None  # modules the plan truncates (SVD) → their rank
    rounding: str = "nearest"  # how integer codes are chosen: "output-aware" or "nearest"
    uniform: list[dict] = field(default_factory=list)  # each uniform level as a whole plan, measured
    continued: dict | None = None  # moves measured one by one past the back-off: {"measured", "kept"}
    held_out: dict | None = None  # the plan measured on held-out texts (see :func:`_hold_out`)


def _bytes(ev: Evaluator, key: str, fmt: str) -> int:
    name, role = key.rsplit(".", 1)
    return stored_bytes(stored_shape(ev.adapters.modules[name], role, ev.storage), fmt)


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


def _gain(ev, name: str, lowest: dict[str, str], measure: str, base_err: float) -> float:
    """Model error per squared output error of module ``name``: one forward pass with its
    tensors at their lowest formats (``lowest``), with nearest codes. The gain is a property of
    where the module sits, not of the codes, and nearest rounding moves the model well above the
    measure's float noise, where output-aware codes may not (sora-gemma's q4_0 modules, one at a
    time: KL at noise level, so every gain was 0 and the greedy order blind)."""
    ka, kb = tensor_key(name, "lora_A"), tensor_key(name, "lora_B")
    e2e = max(additive(measure, ev.error(lowest, rounding=False)[measure]) - additive(measure, base_err), 0.0)
    layer = ev.layer_error(name, lowest[ka], lowest[kb], rounding=False)
    return e2e / layer ** 2 if layer > 0 else 0.0


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
        gain = _gain(ev, name, {**top, ka: low_a, kb: low_b}, measure, base_err)
        sens[ka] = {f: gain * ev.layer_error(name, f, top_fmt) ** p for f in ladders[ka]}
        sens[kb] = {f: gain * ev.layer_error(name, top_fmt, f) ** p for f in ladders[kb]}
        if i % 8 == 7:
            step(f"sensitivity {i + 1}/{len(ev.adapters.modules)} modules")
    return sens


def _from_additive(measure: str, value: float) -> float:
    return value if _quadratic(measure) else value ** 0.5


def search(ev: Evaluator, budget: float | None = None, max_bytes: int | None = None,
           start: dict[str, str] | None = None, progress: Progress | None = None,
           sensitivity: str = "layer", floors: dict[str, float] | None = None, ranks: bool = False,
           holdout: Evaluator | None = None) -> SearchResult:
    """Minimise bytes with ``measure ≤ budget`` (or minimise error with ``bytes ≤ max_bytes``).
    ``sensitivity``: ``layer`` (module output error, scaled to the model's by one forward pass
    per module) or ``model`` (one forward pass per tensor and format). ``ranks``: also lower
    modules' ranks (SVD truncation, :mod:`loradeploy.quant.rank`), chosen jointly with the
    formats by the same measured error per byte saved. ``holdout``: an evaluator on texts the
    search does not see (``codes_from=ev``); with a budget, the plan must also hold on them
    (:func:`_hold_out`), else the search backs off along the plans it accepted; with
    ``max_bytes``, the plans within the bytes (the search's and the whole-plan candidates) are
    compared on them, and the one with the least error there is kept."""
    step = progress or (lambda _m: None)
    measure = MEASURES[ev.task]
    ladders = {tensor_key(n, r): allowed_formats(m, r, ev.storage) for n, m in ev.adapters.modules.items() for r in ROLES}
    top = {k: lad[0] for k, lad in ladders.items()}
    base_err = ev.error(top)[measure]
    order = None
    if ranks:
        order = JointOrder(ev, ladders, top, base_err, measure, step)
        sens, nbytes, plans = order.sens, order.nbytes, order.plans()
    else:
        sens = (_model_sensitivity if sensitivity == "model" else _layer_sensitivity)(ev, ladders, top, base_err, measure, step)
        nbytes = {key: {f: _bytes(ev, key, f) for f in ladder} for key, ladder in ladders.items()}
        plans = _format_order(ladders, top, sens, nbytes, measure)
    bytes_at = [p[2] for p in plans]
    curve: list[dict] = []

    def plan_at(n: int) -> dict[str, str]:
        return plans[n][0]

    def ranks_at(n: int) -> dict[str, int] | None:
        return plans[n][1] or None

    def check(n: int) -> dict:
        got = ev.error(plan_at(n), ranks_at(n))
        curve.append({"moves": n, "bytes": bytes_at[n], **got, "predicted": plans[n][3]})
        step(f"checked a plan of {bytes_at[n]:,} bytes: {measure} {got[measure]:.4g}")
        return got

    floors = DEFAULT_FLOORS.get(ev.task, {}) if floors is None else floors

    def meets(got: dict) -> bool:
        return got[measure] <= budget and all(got.get(k, v) >= v for k, v in floors.items())

    if max_bytes is not None:
        n = next((i for i, b in enumerate(bytes_at) if b <= max_bytes), None)
        if n is None:
            raise LoradeployError(f"no plan fits in {max_bytes:,} bytes (the smallest is {bytes_at[-1]:,})")
        measured = check(n)
    else:
        lo, hi = 0, len(plans) - 1
        first = check(0)
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
    rounding_of = {True: "output-aware", False: "nearest"}
    result = SearchResult(plan_at(n), measured, bytes_at[n], sens, nbytes, curve, plans[n][3], ranks=ranks_at(n),
                          rounding=rounding_of[ev.rounding])
    # the plans accepted on the way, fewer bytes last: (formats, ranks, bytes, calibration measures or None)
    path = [(plan_at(i), ranks_at(i), bytes_at[i], None) for i in range(n)] + [(result.formats, result.ranks,
                                                                                result.nbytes, result.measured)]
    if max_bytes is None and order is not None and n + 1 < len(plans):
        _continue_past(ev, order, plans, n, result, meets, measure, step, path)
    on_held_out = None
    if holdout is not None:
        on_held_out = _hold_out(ev, holdout, path, result, budget if max_bytes is None else None, floors, measure, step)
    # whole plans outside the greedy order, measured the same way: B-LoRA's bit hints (the
    # starting plan) and each uniform level, with the evaluator's rounding and (when that is
    # output-aware) with nearest rounding too (the additive model can misjudge how errors of many
    # tensors combine, and output-aware rounding can lose to nearest where a tensor's error is
    # already at noise level; these keep the result no worse than any of them at its bytes)
    candidates = []
    if start is not None:
        candidates.append(("blora-bit-hints", dict(start), ev.rounding))
    for rounded in sorted({ev.rounding, False}, reverse=True):
        for level, fmt in enumerate(ev.storage.ladder):
            label = f"uniform {fmt}" + (", output-aware rounding" if rounded and fmt in ROUNDED_FORMATS else "")
            if rounded != ev.rounding and fmt not in ROUNDED_FORMATS:
                continue  # the same plan as with the evaluator's rounding
            candidates.append((label, {k: lad[min(level, len(lad) - 1)] if fmt not in lad else fmt
                                       for k, lad in ladders.items()}, rounded))
    for label, formats, rounded in candidates:
        got = ev.error(formats, rounding=rounded)
        size = sum(nbytes[k][f] for k, f in formats.items())
        if label == "blora-bit-hints":
            result.start = {"formats": formats, "bytes": size, **got}
        else:
            result.uniform.append({"plan": label, "bytes": size, **got})
        fits = meets(got) if max_bytes is None else size <= max_bytes
        better = (size, got[measure]) < (result.nbytes, result.measured[measure]) if max_bytes is None \
            else (got[measure], size) < (result.measured[measure], result.nbytes)
        if fits and on_held_out is not None and max_bytes is not None:
            # within the bytes, the plans are compared on the held-out texts: the calibration texts'
            # error is what the search (and output-aware rounding) fitted, the held-out error is not
            on_holdout = on_held_out(label, formats, None, size, rounded)
            better = (on_holdout[measure], size) < (result.held_out["measured"][measure], result.nbytes)
            if better:
                result.held_out["measured"] = on_holdout
        elif fits and better and on_held_out is not None:
            on_holdout = on_held_out(label, formats, None, size, rounded)
            fits = on_holdout["holds"]
            if fits:
                result.held_out["measured"] = on_holdout
        if fits and better:
            result.formats, result.measured, result.nbytes, result.chosen_from = formats, got, size, label
            result.ranks, result.rounding = None, rounding_of[rounded]
    if not any(f in ROUNDED_FORMATS for f in result.formats.values()):
        result.rounding = "nearest"  # no integer format it applies to (e.g. llama.cpp's block types)
    return result


def _format_order(ladders, top, sens, nbytes, measure) -> list[tuple[dict, dict, int, float]]:
    """Whole plans along the greedy order of format drops (one tensor by one level, cheapest
    error per byte saved first): (formats, ranks {}, bytes, predicted measure) per prefix."""
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
    formats = dict(top)
    plans = [(dict(formats), {}, sum(nbytes[k][f] for k, f in formats.items()),
              _from_additive(measure, sum(sens[k][f] for k, f in formats.items())))]
    while heap:
        _, key, nxt = heapq.heappop(heap)
        level[key] = nxt
        formats[key] = ladders[key][nxt]
        plans.append((dict(formats), {}, sum(nbytes[k][f] for k, f in formats.items()),
                      _from_additive(measure, sum(sens[k][f] for k, f in formats.items()))))
        push(key)
    return plans


#: whole plans the continuation past the back-off may measure, per task (:func:`_continue_past`;
#: MiniLM sora converges in ~90). None for language models: their calibration set is a few
#: hundred tokens, and moves picked one by one on it spent the whole KL budget there (sora-gemma:
#: 0.00198 of 0.002, 36% fewer bytes), which on the eval set in llama.cpp (Q4_K_M base) was a KL
#: of 0.0066 from the fp32 reference against the fp16 adapter's 0.0043: over the budget. The
#: back-off alone keeps its margin (1.6e-4)
CONTINUE_EVALUATIONS = {Task.SEQUENCE_CLASSIFICATION: 96, Task.FEATURE_EXTRACTION: 96, Task.CAUSAL_LM: 0}


#: a plan holds on held-out texts when its error there is at most this × the budget (and the
#: floors hold): calibration texts are what the search fits, so its error on them understates
#: the error on other texts (measured, MiniLM adapters: 1.2-1.5× on the eval set), and a plan
#: that flips a text the calibration set lacks shows far above it (B-LoRA: 1.9×)
HOLDOUT_SLACK = 1.5
#: held-out texts per task (taken after the calibration texts, from the same source)
HOLDOUT_TEXTS = {Task.CAUSAL_LM: 8}
HOLDOUT_DEFAULT = 512


def _hold_out(ev, holdout, path, result, budget, floors, measure, step):
    """Measure the plan the search reached on ``holdout``'s texts. With a ``budget``: when it
    does not hold there (:data:`HOLDOUT_SLACK`), back off along ``path`` (the plans accepted,
    highest precision first; binary search, as held-out error grows along it) to the last that
    holds, and measure that one on the calibration texts again. Returns the function that
    measures a whole plan there, for the plans outside ``path``: with a budget they must hold
    there too; without (a byte limit), the one with the least error there is kept."""
    checked = []

    def measure_on_holdout(label, formats, ranks, size, rounding=None) -> dict:
        got = holdout.error(formats, ranks, rounding)
        ok = budget is None or (got[measure] <= HOLDOUT_SLACK * budget
                                and all(got.get(k, v) >= v for k, v in floors.items()))
        checked.append({"plan": label, "bytes": size, "holds": ok, **got})
        step(f"held-out texts: {label} plan of {size:,} bytes: {measure} {got[measure]:.4g}"
             + ("" if ok else f" > {HOLDOUT_SLACK} × the budget"))
        return {"holds": ok, **got}

    last = len(path) - 1
    got = measure_on_holdout("search", path[last][0], path[last][1], path[last][2])
    record = {"texts": sum(len(b["input_ids"]) for b in holdout.batches), "slack": HOLDOUT_SLACK,
              "measured": got, "checked": checked, "backed_off_from": None,
              "role": "budget" if budget is not None else "selection"}
    result.held_out = record
    if budget is None:
        return measure_on_holdout
    if not got["holds"]:
        lo, hi, found = 0, last - 1, {}
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found[mid] = measure_on_holdout("search, backed off", *path[mid][:3])
            if found[mid]["holds"]:
                lo = mid
            else:
                hi = mid - 1
        if lo not in found:
            found[lo] = measure_on_holdout("search, backed off", *path[lo][:3])
        formats, ranks, size, measured = path[lo]
        record.update(measured=found[lo], backed_off_from=path[last][2])
        result.formats, result.ranks, result.nbytes = formats, ranks, size
        result.measured = measured if measured is not None else ev.error(formats, ranks)
        step(f"backed off to {size:,} bytes to hold on the held-out texts: {measure} "
             f"{found[lo][measure]:.4g} there, {result.measured[measure]:.4g} on the calibration texts")

    return measure_on_holdout


def _continue_past(ev, order: "JointOrder", plans, n, result, meets, measure, step, path: list) -> None:
    """Past the prefix the binary search kept, each later move measured on its own: a move that
    keeps the plan within the budget is taken; one that does not is banned, and the later moves
    of its module (which build on it) are skipped. Then the order is rebuilt from the plan
    reached, each module's best move not banned first, and gone through again, until a pass
    takes nothing or the task's ``CONTINUE_EVALUATIONS`` plans were measured. The order's error
    model misjudges some modules more than others (errors of several modules add up or cancel);
    this keeps the cheap moves that come after an expensive one."""
    state, size = order.state_of(plans[n]), plans[n][2]
    banned: set = set()
    tried = taken = 0
    cap = CONTINUE_EVALUATIONS.get(ev.task, 0)
    todo = plans[n + 1:]
    while todo and tried < cap:
        skipped, before_pass = set(), taken
        for plan in todo:
            name, frm, to = plan[4]
            if name in skipped or state[name] != frm:
                continue
            if tried >= cap:
                break
            cand = {**state, name: to}
            formats, rank_of = order.plan_of(cand)
            got = ev.error(formats, rank_of or None)
            tried += 1
            cand_size = size - order.size(name, frm) + order.size(name, to)
            result.curve.append({"moves": f"+{tried}", "bytes": cand_size, **got, "predicted": None})
            if meets(got):
                state, size, taken = cand, cand_size, taken + 1
                result.formats, result.ranks, result.nbytes, result.measured = formats, rank_of or None, size, got
                path.append((formats, rank_of or None, size, got))
            else:
                banned.add(plan[4])
                skipped.add(name)
        if taken == before_pass:
            break
        todo = order.plans(state, banned)[1:]
    if not tried:
        return
    result.continued = {"measured": tried, "kept": taken}
    step(f"continued past the back-off: {taken} of {tried} measured moves kept, {result.nbytes:,} bytes: "
         f"{measure} {result.measured[measure]:.4g}")


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
            g = self.gain[name] = _gain(ev, name, {**top, ka: low_a, kb: low_b}, measure, base_err)
            self.sens[ka] = {f: g * ev.layer_error(name, f, top[kb]) ** 2 for f in ladders[ka]}
            self.sens[kb] = {f: g * ev.layer_error(name, top[ka], f) ** 2 for f in ladders[kb]}
            self.nbytes[ka] = {f: _bytes(ev, ka, f) for f in ladders[ka]}
            self.nbytes[kb] = {f: _bytes(ev, kb, f) for f in ladders[kb]}
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
            return formats, rank_of, total, _from_additive(self.measure, sum(self.err(n, state[n]) for n in self.names)), move

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
