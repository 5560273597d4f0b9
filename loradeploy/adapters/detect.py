"""Which method wrote a checkpoint, sniffed from its config and tensor names."""

from __future__ import annotations

import re

from ..errors import AdapterFormatError
from ..ir import Method
from .checkpoint import Checkpoint

#: ``peft_type`` values of adapter_config.json and the method each one means.
PEFT_TYPES: dict[str, Method] = {
    "LORA": Method.PEFT_LORA,
    "ADALORA": Method.PEFT_ADALORA,
    "BLORA": Method.BLORA,  # KseniaSycheva/peft fork, tuner `blora`
}

_SORA_KEY = re.compile(r"\.lora\.(lora_A|lora_B|gate)$")
_INCRELORA_KEY = re.compile(r"\.lora_[ABE]\.\d+$")
_PEFT_KEY = re.compile(r"\.lora_[AB](\.weight)?$")


def detect(ckpt: Checkpoint) -> Method:
    """Return the method of ``ckpt``; raise :class:`AdapterFormatError` when none fits."""
    config = ckpt.config("adapter_config.json")
    if config is not None:
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type not in PEFT_TYPES:
            raise AdapterFormatError(
                ckpt.configs["adapter_config.json"],
                f"peft_type {config.get('peft_type')!r} is not supported "
                f"(supported: {', '.join(PEFT_TYPES)})",
            )
        return PEFT_TYPES[peft_type]
    keys = list(ckpt.tensors)
    if any(_SORA_KEY.search(k) for k in keys):
        return Method.SORA
    if any(_INCRELORA_KEY.search(k) for k in keys):
        return Method.INCRELORA
    if any(_PEFT_KEY.search(k) for k in keys):
        raise AdapterFormatError(
            ckpt.weights, "PEFT-style LoRA tensors but no adapter_config.json beside them"
        )
    shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
    raise AdapterFormatError(
        ckpt.weights,
        f"unknown layout: no SoRA, IncreLoRA, B-LoRA or PEFT LoRA tensors among {len(keys)} "
        f"keys ({shown}); pass --format if you know the method",
    )
