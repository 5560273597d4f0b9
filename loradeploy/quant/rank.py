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


def _whitening(gram) -> torch.Tensor:
    """L with L Lᵀ = the damped gram (the rounding's damping): ‖X Eᵀ‖²_F ≈ ‖E L‖²_F."""
    from .rounding import DAMPING

    h = torch.as_tensor(gram, dtype=torch.float64).clone()
    mean = float(h.diagonal().mean())
    h.diagonal().add_(DAMPING * (mean if mean > 0 else 1.0))
    return torch.linalg.cholesky(h)


def decompose(m: LoraModule, gram=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, Σ, R) with ΔW = U diag(Σ) R, Σ descending, from which :func:`truncate` cuts: the SVD of
    ΔW (R = Vᵀ), or given ``gram`` the SVD of ΔW·L (R = Vᵀ L⁻¹)."""
    delta = m.delta_weight()
    if gram is None:
        return torch.linalg.svd(delta, full_matrices=False)
    low = _whitening(gram)
    u, s, vh = torch.linalg.svd(delta @ low, full_matrices=False)
    r = min(m.rank, vh.shape[0])  # ΔW has rank ≤ r: the rest is zero
    return u[:, :r], s[:r], torch.linalg.solve_triangular(low.T, vh[:r].T, upper=True).T


def truncate(m: LoraModule, k: int, gram=None, parts=None) -> LoraModule:
    """The module at rank ``k`` (≤ its rank): itself at full rank, else the SVD re-factoring —
    of ΔW (the best rank-k approximation in ‖·‖_F), or, given ``gram`` (XᵀX of the module's
    calibration inputs), of ΔW·L with L Lᵀ = XᵀX + λI: the rank-k ΔW_k with the least output error
    ‖X (ΔW_k − ΔW)ᵀ‖ on those inputs, stored as ``A = √Σ_k V_kᵀ L⁻¹``, ``B = U_k √Σ_k``.
    ``parts``: :func:`decompose`'s result for the same (m, gram), when cut at several ranks."""
    if k >= m.rank:
        return m
    if k < 1:
        raise ValueError(f"module {m.name}: rank {k} is below 1 (drop the module instead)")
    u, s, right = parts if parts is not None else decompose(m, gram)
    root = s[:k].sqrt()
    a = (root[:, None] * right[:k]).to(torch.float32).contiguous()
    b = (u[:, :k] * root).to(torch.float32).contiguous()
    return LoraModule(m.name, a, b, 1.0)


def energy_kept(m: LoraModule, k: int, gram=None) -> float:
    """Share of ‖ΔW‖²_F the rank-``k`` truncation keeps (1.0 at full rank); given ``gram``, the
    share of the output energy ‖ΔW L‖²_F the output-aware truncation keeps."""
    delta = m.delta_weight()
    s2 = torch.linalg.svdvals(delta if gram is None else delta @ _whitening(gram)) ** 2
    total = float(s2.sum())
    return 1.0 if total == 0 or k >= m.rank else float(s2[:k].sum()) / total


def truncate_adapter(adapters: AdapterSet, ranks: dict[str, int] | None, grams: dict | None = None) -> AdapterSet:
    """``adapters`` with each module named in ``ranks`` at that rank (others unchanged);
    ``grams`` (module → XᵀX): output-aware truncation."""
    if not ranks:
        return adapters
    grams = grams or {}
    return replace(adapters, modules={n: truncate(m, ranks.get(n, m.rank), grams.get(n) if n in ranks else None)
                                      for n, m in adapters.modules.items()})
