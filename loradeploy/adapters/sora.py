"""SoRA (TsinghuaC3I/SoRA): OpenDelta parallel LoRA named ``lora`` with a per-rank gate.

Keys per adapted Linear ``P``: ``P.lora.lora_A [r,in]``, ``P.lora.lora_B [out,r]``,
``P.lora.gate [1,r]``. ΔW = (lora_alpha / r) · B · diag(gate) · A, r the tensor's rank.
The file holds only trainable tensors: lora_alpha comes from ``lora_config.json`` (or the
user; SoRA's default is 16) and a classifier head, if any, from elsewhere.
"""

from __future__ import annotations

import logging
import re

from ..errors import AdapterFormatError
from ..ir import DECODER_MODULE, AdapterSet, LoraModule, Method
from .checkpoint import Checkpoint, ReadOptions
from .common import blame, group_by_module, load_head, positive_integer, positive_number, rank_of, require

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<role>lora_A|lora_B|gate)$")
DEFAULT_LORA_ALPHA = 16.0  # SoRA's config/lora_config.json and OpenDelta's LoraConfig


def _hyperparameters(ckpt: Checkpoint, options: ReadOptions) -> tuple[float, int | None, list[str]]:
    notes = []
    config = ckpt.config("lora_config.json") or ckpt.config("config/lora_config.json") or {}
    where = ckpt.configs.get("lora_config.json") or ckpt.configs.get("config/lora_config.json")
    if options.lora_alpha is not None:
        alpha = positive_number(ckpt.weights, "--lora-alpha", options.lora_alpha)
    elif "lora_alpha" in config:
        alpha = positive_number(where, "lora_alpha", config["lora_alpha"])
    else:
        alpha = DEFAULT_LORA_ALPHA
        notes.append(
            f"lora_alpha is not stored by SoRA and no lora_config.json was found: assumed "
            f"{DEFAULT_LORA_ALPHA:g} (SoRA's default); pass --lora-alpha if you trained with another"
        )
    if options.lora_r is not None:
        r = options.lora_r
    else:
        r = positive_integer(where, "lora_r", config["lora_r"]) if config.get("lora_r") is not None else None
    return alpha, r, notes


def read(ckpt: Checkpoint, options: ReadOptions) -> AdapterSet:
    path = ckpt.weights
    alpha, lora_r, notes = _hyperparameters(ckpt, options)
    groups = group_by_module(ckpt.tensors, _KEY)
    modules = {}
    with blame(path):
        for name, parts in sorted(groups.items()):
            require(path, name, parts, ("lora_A", "lora_B", "gate"))
            r = rank_of(path, name, parts["lora_A"])
            if lora_r is not None and lora_r != r:
                raise AdapterFormatError(
                    path, f"module {name}: lora_r is {lora_r} but its tensors have rank {r}"
                )
            modules[name] = LoraModule(
                name, parts["lora_A"], parts["lora_B"], alpha / r, gate=parts["gate"]
            )
    lora_keys = {k for k in ckpt.tensors if _KEY.match(k)}
    extras = {k: t for k, t in ckpt.tensors.items() if k not in lora_keys}
    head, head_files = load_head(ckpt, options)
    if head:
        notes.append(f"classifier head read from {head_files[0]}")
    elif not any(k.startswith(("classifier.", "score.")) for k in extras) and \
            not all(DECODER_MODULE.search(n) for n in modules):
        notes.append(
            "no classifier head: SoRA checkpoints hold LoRA tensors only; for classification "
            "pass --head FILE (or put head.safetensors beside the checkpoint)"
        )
    with blame(path):
        return AdapterSet(
            method=Method.SORA,
            modules=modules,
            extra_tensors={**extras, **head},
            hyperparameters={"lora_alpha": alpha, "lora_r": max((m.rank for m in modules.values()), default=None)},
            sources=ckpt.sources(*head_files),
            notes=notes,
        )
