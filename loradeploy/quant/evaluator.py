"""Simulating a precision plan: the base with the adapter merged as a plan stores it (re-merging
only the modules a plan changes), its outputs on fixed calibration inputs, and their error
against the fp32 adapter's (all against the pruned adapter in fp32, which equals the trained
adapter): classifier ``mean_abs_logit`` (mean |Δlogit|), embeddings ``cosine_distance``
(1 − mean cosine), language model ``kl_mean`` (mean per-token KL(reference ‖ plan)); the
formulas are :mod:`loradeploy.measures`' and :mod:`loradeploy.lm_measures`'."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .. import measures, registry
from ..ir import AdapterSet, LoraModule, Task
from ..lm_measures import LmReference, kl_and_top1
from ..merge import find_module, load_extras
from .formats import ROW_WISE, round_activations
from .plan import ROLES, quantize_adapter, tensor_key
from .rank import decompose, truncate
from .rounding import ROUNDED_FORMATS

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
    """The error measures of a plan's outputs against the reference outputs (per batch)."""
    if task is Task.CAUSAL_LM:
        return kl_and_top1(reference, got)
    ref, out = torch.cat(reference), torch.cat(got)
    if task is Task.SEQUENCE_CLASSIFICATION:
        errors = measures.logit_errors(ref, out)
        return {k: errors[k] for k in ("mean_abs_logit", "max_abs_logit", "label_agreement")}
    cos = measures.cosines(ref, out)
    return {"cosine_distance": float(1 - cos.mean()), "cosine_min": float(cos.min())}


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
