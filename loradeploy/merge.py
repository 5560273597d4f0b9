"""Fold ΔW into base weights (and load the tensors that travel with the adapter)."""

from __future__ import annotations

import torch

from .errors import BaseModelError
from .ir import AdapterSet


def find_module(model: torch.nn.Module, name: str) -> tuple[str, torch.nn.Module]:
    """The submodule for an adapter module ``name``, tolerating a missing or extra backbone
    prefix (``bert.encoder…`` vs ``encoder…``)."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    for c in candidates:
        if c in modules:
            return c, modules[c]
    raise BaseModelError(f"module {name} of the adapter is not in the base model")


def _check_linear(name: str, module: torch.nn.Module, out_f: int, in_f: int) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise BaseModelError(f"module {name} of the base model is not a linear layer")
    if tuple(weight.shape) != (out_f, in_f):
        raise BaseModelError(
            f"module {name}: adapter ΔW is [{out_f}, {in_f}] but the base weight is {list(weight.shape)}"
        )
    return weight


def check_fits(model: torch.nn.Module, adapters: AdapterSet) -> None:
    """Raise :class:`BaseModelError` when a module is missing or its shapes do not fit."""
    for m in adapters.modules.values():
        qualified, module = find_module(model, m.name)
        _check_linear(qualified, module, m.out_features, m.in_features)


@torch.no_grad()
def merge_into(model: torch.nn.Module, adapters: AdapterSet) -> torch.nn.Module:
    """Add every module's ΔW (computed in float64) to its base weight, in place, and load the
    adapter's extra tensors (e.g. a classifier head). Returns ``model``."""
    check_fits(model, adapters)
    for m in adapters.modules.values():
        qualified, module = find_module(model, m.name)
        w = module.weight
        w.copy_((w.to(torch.float64) + m.delta_weight()).to(w.dtype))
    load_extras(model, adapters)
    return model


def is_head_tensor(model: torch.nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` belongs to the task head (outside the backbone
    ``model.<base_model_prefix>``): the base has no trained value for it."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return bool(prefix) and hasattr(model, prefix) and not name.startswith(f"{prefix}.")


@torch.no_grad()
def load_extras(model: torch.nn.Module, adapters: AdapterSet, heads_only: bool = False) -> None:
    """Copy the adapter's extra tensors into ``model`` (only the task head's with ``heads_only``)."""
    params = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    for key, t in adapters.extra_tensors.items():
        target = key if key in params else f"{prefix}.{key}"
        if heads_only and not is_head_tensor(model, target):
            continue
        if target not in params:
            raise BaseModelError(f"tensor {key} of the adapter has no place in the base model")
        if params[target].shape != t.shape:
            raise BaseModelError(
                f"tensor {key}: adapter has {list(t.shape)}, base model has {list(params[target].shape)}"
            )
        params[target].copy_(t.to(params[target].dtype))
