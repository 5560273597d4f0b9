"""Whether pruning kept an adapter's effect: every module's ΔW within the prune tolerance."""

from __future__ import annotations

import torch

from loradeploy.ir import AdapterSet
from loradeploy.prune import EXACT_RTOL


def assert_exact(original: AdapterSet, pruned: AdapterSet):
    """Every module of ``original`` has the same ΔW in ``pruned`` (a module dropped there counts
    as ΔW = 0), to :data:`loradeploy.prune.EXACT_RTOL` of its largest entry."""
    for name, m in original.modules.items():
        ref = m.delta_weight()
        new = pruned.modules[name].delta_weight() if name in pruned.modules else torch.zeros_like(ref)
        tol = EXACT_RTOL * float(ref.abs().max())
        assert float((new - ref).abs().max()) <= tol, name
