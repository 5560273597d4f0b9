"""The ``--slots`` spec: which modules of a base get a LoRA slot in a swappable artifact (the
grammar; the modules of a given PyTorch base it selects: :mod:`loradeploy.base_slots`).

A swappable graph takes LoRA factors as inputs for a fixed set of modules, its *slots*. Slots are
chosen for the base, not for the adapters being exported, so that any adapter trained for the same
base loads into any swappable artifact of that base. ``--slots`` (or a profile's ``slots`` key) is
a comma-separated list of:

* ``blocks`` (default): every linear layer inside the base's layer stack — attention and MLP
  projections of every layer (the classifier head and the pooler are outside);
* ``adapters``: only the modules the exported adapters adapt (fewer graph nodes; other adapters
  then fit only where they adapt a subset of these);
* ``norms``: the weight and bias of every normalization layer of the base (every block's
  LayerNorms, the embeddings' LayerNorm; a decoder LM's RMSNorm weights) become overridable inputs
  defaulting to the base's own
  values, so an adapter that trained them (OpenDelta SoRA, PEFT ``modules_to_save``) loads too;
* a module name or a name suffix, PEFT ``target_modules`` style (``query``, ``attention.output.dense``,
  ``bert.pooler.dense``): every linear layer of the base whose name is it or ends in ``.`` + it.

The default, ``blocks,norms``, keeps the promise that any adapter for the base loads into any
swappable artifact of it; ``blocks`` alone leaves the norms constant. The modules the exported
adapters adapt, and the tensors they carry, always get a slot; a classifier head is always an input.
"""

from __future__ import annotations

import re

from .errors import LoradeployError

DEFAULT = "blocks,norms"
KEYWORDS = ("blocks", "adapters", "norms")


def parse(spec: str | None) -> tuple[str, ...]:
    """``--slots`` text → its tokens (:data:`DEFAULT`'s when empty)."""
    tokens = tuple(t.strip() for t in (spec or DEFAULT).split(",") if t.strip())
    if not tokens:
        return parse(DEFAULT)
    for t in tokens:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", t):
            raise LoradeployError(f"--slots: {t!r} is not a module name, name suffix, 'blocks', 'norms' or 'adapters'")
    return tokens


def natural_key(name: str) -> list:
    """Sort key that puts layer 2 before layer 10 (digit runs compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
