"""IncreLoRA (FeiyuZhang98/IncreLoRA, loralib ``SVDLinear``): ranks added during training.

Per adapted module ``P``: ParameterLists ``P.lora_A.k`` (``[r0,in]`` then ``[1,in]``),
``P.lora_E.k`` (``[r0,1]`` then ``[1,1]``), ``P.lora_B.k`` (``[out,r0]`` then ``[out,1]``)
and ``P.ranknum [1]``. ΔW = cat(B) @ (cat(A) * cat(E)) · lora_alpha / (ranknum + 1e-5).
The file is a full model: base tensors are set aside, the task head travels with the adapter.
``lora_alpha`` comes from ``config.json`` beside the file.
"""

from __future__ import annotations

import re

import torch

from ..errors import AdapterFormatError
from ..ir import AdapterSet, LoraModule, Method, Task
from .checkpoint import Checkpoint, ReadOptions
from .common import blame, head_tensors, positive_number

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>[ABE])\.(?P<k>\d+)$")
_RANKNUM = ".ranknum"
RANKNUM_EPS = 1e-5  # loralib adds it to ranknum in the scale


def _alpha(ckpt: Checkpoint, options: ReadOptions) -> float:
    if options.lora_alpha is not None:
        return positive_number(ckpt.weights, "--lora-alpha", options.lora_alpha)
    config = ckpt.config("config.json") or {}
    if "lora_alpha" not in config:
        raise AdapterFormatError(
            ckpt.weights,
            "IncreLoRA checkpoint without lora_alpha: put its config.json beside it "
            "or pass --lora-alpha",
        )
    return positive_number(ckpt.configs["config.json"], "lora_alpha", config["lora_alpha"])


def _lists(ckpt: Checkpoint) -> dict[str, dict[str, list[torch.Tensor]]]:
    entries: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, t in ckpt.tensors.items():
        m = _KEY.match(key)
        if m:
            entries.setdefault(m["module"], {}).setdefault(m["role"], {})[int(m["k"])] = t
    lists = {}
    for name, roles in entries.items():
        for role in "ABE":
            ks = sorted(roles.get(role, {}))
            if not ks:
                raise AdapterFormatError(ckpt.weights, f"module {name}: missing lora_{role}")
            if ks != list(range(len(ks))):
                raise AdapterFormatError(
                    ckpt.weights, f"module {name}: lora_{role} entries are not 0..{len(ks) - 1}: {ks}"
                )
        counts = {role: len(roles[role]) for role in "ABE"}
        if len(set(counts.values())) != 1:
            raise AdapterFormatError(
                ckpt.weights, f"module {name}: list lengths differ (A, B, E: {counts})"
            )
        lists[name] = {role: [roles[role][k] for k in range(counts[role])] for role in "ABE"}
    return lists


def _cat(path, name: str, role: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    try:
        return torch.cat(parts, dim=dim)
    except RuntimeError as e:
        shapes = [list(p.shape) for p in parts]
        raise AdapterFormatError(path, f"module {name}: lora_{role} entries do not stack: {shapes}") from e


def read(ckpt: Checkpoint, options: ReadOptions) -> AdapterSet:
    path = ckpt.weights
    alpha = _alpha(ckpt, options)
    modules = {}
    with blame(path):
        for name, lists in sorted(_lists(ckpt).items()):
            A = _cat(path, name, "A", lists["A"], 0)
            B = _cat(path, name, "B", lists["B"], 1)
            E = _cat(path, name, "E", lists["E"], 0)
            if E.dim() != 2 or E.shape[1] != 1:
                raise AdapterFormatError(path, f"module {name}: lora_E must be [r,1], got {list(E.shape)}")
            ranknum = ckpt.tensors.get(name + _RANKNUM)
            if ranknum is None or ranknum.numel() != 1:
                raise AdapterFormatError(path, f"module {name}: missing or malformed {name}{_RANKNUM}")
            rn = positive_number(path, f"{name}{_RANKNUM}", ranknum.item())
            modules[name] = LoraModule(name, A, B, alpha / (rn + RANKNUM_EPS), gate=E.reshape(-1))
        lora_keys = {k for k in ckpt.tensors if _KEY.match(k) or k.endswith(_RANKNUM)}
        rest = {k: t for k, t in ckpt.tensors.items() if k not in lora_keys}
        head = head_tensors(rest)
        notes = []
        if len(rest) > len(head):
            notes.append(f"{len(rest) - len(head)} base-model tensors in the checkpoint set aside")
        config = ckpt.config("config.json") or {}
        return AdapterSet(
            method=Method.INCRELORA,
            modules=modules,
            extra_tensors=head,
            base_model_hint=config.get("_name_or_path"),
            hyperparameters={"lora_alpha": alpha, "lora_r": config.get("lora_r"),
                             "lora_module": config.get("lora_module")},
            sources=ckpt.sources(),
            notes=notes,
            declared_task=_architecture_task(config),
        )


def _architecture_task(config: dict) -> Task | None:
    """The task of the transformers class IncreLoRA's config.json names (``architectures``)."""
    names = config.get("architectures") or []
    if any(str(n).endswith("ForCausalLM") for n in names):
        return Task.CAUSAL_LM
    if any(str(n).endswith("ForSequenceClassification") for n in names):
        return Task.SEQUENCE_CLASSIFICATION
    return None
