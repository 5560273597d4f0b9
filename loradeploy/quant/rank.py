"""Rank as a plan knob: a module's ΔW re-factored by SVD to a lower rank.

After exact pruning a module holds ``ΔW = s · B · A`` at rank r. In float64, ``ΔW = U Σ Vᵀ``;
keeping the k largest singular values gives the best rank-k approximation in the Frobenius
and spectral norms (Eckart–Young), stored balanced as ``A_k = √Σ_k V_kᵀ [k, in]`` and
``B_k = U_k √Σ_k [out, k]`` with scale 1 (both factors of one magnitude, which suits their
quantization). At k = r the module is returned unchanged: truncation is only what a plan
decides, exact pruning stays exact.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ir import AdapterSet, LoraModule


def spectrum(m: LoraModule) -> torch.Tensor:
    """Singular values of the module's ΔW (float64, descending)."""
    return torch.linalg.svdvals(m.delta_weight())


def truncate(m: LoraModule, k: int) -> LoraModule:
    """The module at rank ``k`` (≤ its rank): itself at full rank, else the SVD re-factoring."""
    if k >= m.rank:
        return m
    if k < 1:
        raise ValueError(f"module {m.name}: rank {k} is below 1 (drop the module instead)")
    u, s, vh = torch.linalg.svd(m.delta_weight(), full_matrices=False)
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).to(torch.float32).contiguous()
    b = (u[:, :k] * root).to(torch.float32).contiguous()
    return LoraModule(m.name, a, b, 1.0)


def energy_kept(m: LoraModule, k: int) -> float:
    """Share of ‖ΔW‖²_F the rank-``k`` truncation keeps (1.0 at full rank)."""
    s2 = spectrum(m) ** 2
    total = float(s2.sum())
    return 1.0 if total == 0 or k >= m.rank else float(s2[:k].sum()) / total


def truncate_adapter(adapters: AdapterSet, ranks: dict[str, int] | None) -> AdapterSet:
    """``adapters`` with each module named in ``ranks`` at that rank (others unchanged)."""
    if not ranks:
        return adapters
    return replace(adapters, modules={n: truncate(m, ranks.get(n, m.rank)) for n, m in adapters.modules.items()})
