"""The modules of a PyTorch base that get a LoRA slot, as a ``--slots`` spec (:mod:`loradeploy.slots`)
selects them: every linear layer of the layer stack, the adapters' own modules, or named ones; and
the normalization parameters that become overridable inputs (``norms``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .errors import LoradeployError
from .merge import find_module
from .slots import natural_key, parse

if TYPE_CHECKING:
    import torch

    from .ir import AdapterSet


def linear_layers(model: "torch.nn.Module") -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of ``model`` → (in, out)."""
    import torch

    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def block_linears(model: "torch.nn.Module") -> dict[str, tuple[int, int]]:
    """The linear layers inside the base's layer stack (its longest ``nn.ModuleList``)."""
    import torch

    stacks = [(len(m), n) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not stacks:
        return {}
    stack = max(stacks)[1] + "."
    return {n: s for n, s in linear_layers(model).items() if n.startswith(stack)}


def is_norm(module: "torch.nn.Module") -> bool:
    """A normalization layer: ``nn.LayerNorm`` or a model's own ``…LayerNorm`` / ``…RMSNorm`` class."""
    import torch

    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def norm_parameters(model: "torch.nn.Module", spec: str | None) -> list[str]:
    """The parameters (weight, bias) of every normalization layer of ``model`` when ``spec``
    asks for ``norms``, else none; in natural order."""
    if "norms" not in parse(spec):
        return []
    names = [f"{n}.{k}" for n, m in model.named_modules() if is_norm(m)
             for k, p in m.named_parameters(recurse=False) if p is not None]
    return sorted(names, key=natural_key)


def choose(model: "torch.nn.Module", adapters: Iterable["AdapterSet"], spec: str | None) -> dict[str, tuple[int, int]]:
    """Qualified module name (as in ``model``) → (in, out) for every slot ``spec`` asks for,
    plus every module the ``adapters`` adapt; in natural order (layer 2 before layer 10)."""
    linears = linear_layers(model)
    chosen: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for name, m in adapter.modules.items():
            chosen[find_module(model, name)[0]] = (m.in_features, m.out_features)
    for token in parse(spec):
        if token in ("adapters", "norms"):
            continue
        if token == "blocks":
            found = block_linears(model)
        else:
            found = {n: s for n, s in linears.items() if n == token or n.endswith("." + token)}
        if not found:
            raise LoradeployError(f"--slots: {token!r} matches no linear layer of the base "
                                  f"({type(model).__name__}: {len(linears)} linear layers)")
        chosen.update(found)
    return dict(sorted(chosen.items(), key=lambda kv: natural_key(kv[0])))
