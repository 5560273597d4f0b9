"""Which modules of a base get a LoRA slot in a swappable artifact.

A swappable graph takes LoRA factors as inputs for a fixed set of modules, its *slots*. Slots are
chosen for the base, not for the adapters being exported, so that any adapter trained for the same
base loads into any swappable artifact of that base. ``--slots`` (or a profile's ``slots`` key) is
a comma-separated list of:

* ``blocks`` (default): every linear layer inside the base's layer stack — attention and MLP
  projections of every layer (the classifier head and the pooler are outside);
* ``adapters``: only the modules the exported adapters adapt (fewer graph nodes; other adapters
  then fit only where they adapt a subset of these);
* a module name or a name suffix, PEFT ``target_modules`` style (``query``, ``attention.output.dense``,
  ``bert.pooler.dense``): every linear layer of the base whose name is it or ends in ``.`` + it.

The modules the exported adapters adapt always get a slot.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from .errors import LoradeployError

if TYPE_CHECKING:
    import torch

    from .ir import AdapterSet

DEFAULT = "blocks"
KEYWORDS = ("blocks", "adapters")


def parse(spec: str | None) -> tuple[str, ...]:
    """``--slots`` text → its tokens (``blocks`` when empty)."""
    tokens = tuple(t.strip() for t in (spec or DEFAULT).split(",") if t.strip())
    if not tokens:
        return (DEFAULT,)
    for t in tokens:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", t):
            raise LoradeployError(f"--slots: {t!r} is not a module name, name suffix, 'blocks' or 'adapters'")
    return tokens


def natural_key(name: str) -> list:
    """Sort key that puts layer 2 before layer 10 (digit runs compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


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


def choose(model: "torch.nn.Module", adapters: Iterable["AdapterSet"], spec: str | None) -> dict[str, tuple[int, int]]:
    """Qualified module name (as in ``model``) → (in, out) for every slot ``spec`` asks for,
    plus every module the ``adapters`` adapt; in natural order (layer 2 before layer 10)."""
    from .merge import find_module

    linears = linear_layers(model)
    chosen: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for name, m in adapter.modules.items():
            chosen[find_module(model, name)[0]] = (m.in_features, m.out_features)
    for token in parse(spec):
        if token == "adapters":
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
