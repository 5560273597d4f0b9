"""Bayesian-LoRA, as saved by its second author's PEFT fork (KseniaSycheva/peft, tuner ``blora``).

``adapter_config.json`` has ``peft_type: BLORA``. With ``prune_rank`` (the default) each module
``P`` (``base_model.model.<module>``) holds ``P.lora_A [r,in]``, ``P.lora_E [r,1]``,
``P.lora_B [out,r]`` and hard-concrete log-alphas: ``P.lora_E_quantizer.quantizer.gamma_2``
``[r-1]`` gates the ranks (nested: mask = [1, cumprod(on)]), and
``P.<T>_quantizer.quantizer.gamma_{4,8,16,32}`` gate the bit-widths of tensor T.
ΔW = (lora_alpha / r) · B · diag(E ⊙ mask) · A.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import AdapterFormatError
from ..ir import AdapterSet, LoraModule, Method
from .checkpoint import Checkpoint, ReadOptions
from .common import blame, group_by_module, head_tensors, positive_integer, positive_number, rank_of, require
from .peft import declared_task

PREFIX = "base_model.model."
# Hard-concrete stretch (Louizos et al.): beta = 2/3, gamma = -0.1, zeta = 1.1. Bayesian Bits'
# test-time rule keeps a gate when sigmoid(beta * ln(-gamma / zeta) - log_alpha) < 0.34, i.e.
# log_alpha > beta * ln(-gamma / zeta) - logit(0.34) ≈ -0.9353.
HC_BETA, HC_GAMMA, HC_ZETA, HC_THRESHOLD = 2.0 / 3.0, -0.1, 1.1, 0.34
GATE_ON_THRESHOLD = HC_BETA * math.log(-HC_GAMMA / HC_ZETA) - math.log(HC_THRESHOLD / (1 - HC_THRESHOLD))
BIT_GATES = (4, 8, 16, 32)  # gamma_4 … gamma_32, read in order
WEIGHT_QUANTIZERS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "gate"}  # → IR role

_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<role>lora_[ABE])(\.weight)?$")
_GATE = re.compile(r"^(?P<module>.+)\.(?P<role>lora_\w+?)_quantizer\.quantizer\.gamma_(?P<bits>\d+)$")


def gate_on(log_alpha: torch.Tensor) -> torch.Tensor:
    return log_alpha > GATE_ON_THRESHOLD


def nested_rank_mask(gamma_2: torch.Tensor) -> torch.Tensor:
    """[1, cumprod(on(gamma_2))]: the first rank is always kept; a closed gate closes all after."""
    on = gate_on(gamma_2.reshape(-1).to(torch.float64)).to(torch.int64)
    return torch.cat([torch.ones(1, dtype=torch.int64), torch.cumprod(on, 0)]).to(torch.bool)


def learned_bits(gammas: dict[int, torch.Tensor]) -> int | None:
    """2 · 2^(number of leading bit gates on), reading gamma_4, gamma_8, … in order."""
    if not gammas:
        return None
    n = 0
    for b in BIT_GATES:
        g = gammas.get(b)
        if g is None or not bool(gate_on(g.reshape(-1)[:1].to(torch.float64))[0]):
            break
        n += 1
    return 2 * 2**n


def _gates(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[int, torch.Tensor]]]:
    out: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _GATE.match(key)
        if m:
            out.setdefault(m["module"], {}).setdefault(m["role"], {})[int(m["bits"])] = t
    return out


def _module(path, name: str, parts: dict, gates: dict, scale: float, prune_rank: bool) -> LoraModule:
    r = rank_of(path, name, parts["lora_A"])
    mask = None
    if prune_rank:
        require(path, name, parts, ("lora_A", "lora_B", "lora_E"))
        gamma_2 = gates.get("lora_E", {}).get(2)
        if gamma_2 is not None:
            if gamma_2.numel() != r - 1:
                raise AdapterFormatError(
                    path, f"module {name}: rank gates gamma_2 have {gamma_2.numel()} entries, "
                    f"expected r-1 = {r - 1}",
                )
            mask = nested_rank_mask(gamma_2)
    bits = {role: learned_bits(gates.get(q, {})) for q, role in WEIGHT_QUANTIZERS.items()}
    gate = parts.get("lora_E")
    if gate is not None and (gate.dim() != 2 or gate.shape[1] != 1):
        raise AdapterFormatError(path, f"module {name}: lora_E must be [r,1], got {list(gate.shape)}")
    return LoraModule(name, parts["lora_A"], parts["lora_B"], scale, gate=gate, rank_mask=mask,
                      bits={k: v for k, v in bits.items() if v is not None})


def read(ckpt: Checkpoint, options: ReadOptions) -> AdapterSet:
    path = ckpt.weights
    cfg_path = ckpt.configs["adapter_config.json"]
    config = ckpt.config("adapter_config.json")
    alpha = positive_number(cfg_path, "lora_alpha", options.lora_alpha or config.get("lora_alpha"))
    r = positive_integer(cfg_path, "r", config.get("r"))
    prune_rank = bool(config.get("prune_rank", True))
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in ckpt.tensors.items()}
    gate_keys = {k for k in stripped if _GATE.match(k)}
    factors = group_by_module({k: t for k, t in stripped.items() if k not in gate_keys}, _FACTOR)
    gates = _gates(stripped)
    modules = {}
    with blame(path):
        for name, parts in sorted(factors.items()):
            require(path, name, parts, ("lora_A", "lora_B"))
            if rank_of(path, name, parts["lora_A"]) != r:
                raise AdapterFormatError(
                    path, f"module {name}: rank {parts['lora_A'].shape[0]} but adapter_config.json says r={r}"
                )
            modules[name] = _module(path, name, parts, gates.get(name, {}), alpha / r, prune_rank)
        head = head_tensors(stripped)
        return AdapterSet(
            method=Method.BLORA,
            modules=modules,
            extra_tensors=head,
            base_model_hint=config.get("base_model_name_or_path"),
            hyperparameters={k: config.get(k) for k in ("r", "lora_alpha", "prune_rank", "quantize",
                                                        "n_bits", "task_type")},
            sources=ckpt.sources(),
            declared_task=declared_task(config),
        )
