"""SVD rank truncation (loradeploy.quant.rank) on the shipped examples' real modules."""

import pytest
import torch

from loradeploy.adapters import read_adapter
from loradeploy.prune import prune
from loradeploy.quant.rank import decompose, energy_kept, spectrum, truncate
from tests.support.paths import EXAMPLE_ADAPTERS


@pytest.fixture(scope="module", params=["sora", "increlora", "blora"])
def modules(request):
    return list(prune(read_adapter(EXAMPLE_ADAPTERS / request.param))[0].modules.values())


def test_refactoring_at_full_rank_reproduces_delta_w(modules):
    """The SVD factors at the module's own rank give its ΔW back to 1e-6 relative (forced through
    the SVD path, which truncate skips at full rank)."""
    for m in modules:
        u, s, vh = torch.linalg.svd(m.delta_weight(), full_matrices=False)
        root = s[:m.rank].sqrt()
        a, b = (root[:, None] * vh[:m.rank]).float(), (u[:, :m.rank] * root).float()
        d = m.delta_weight()
        err = (b.double() @ a.double() - d).norm() / d.norm()
        assert err < 1e-6, m.name
        assert truncate(m, m.rank) is m  # exact pruning stays exact: no re-factoring at full rank


def test_truncation_error_is_the_dropped_spectrum(modules):
    """Eckart–Young: ‖ΔW − ΔW_k‖²_F equals the sum of the dropped σ², and energy_kept the rest."""
    m = max(modules, key=lambda m: m.rank)
    s2 = spectrum(m) ** 2
    for k in range(1, m.rank):
        t = truncate(m, k)
        assert t.rank == k and t.scale == 1.0 and t.lora_A.shape == (k, m.in_features)
        gap = float((t.delta_weight() - m.delta_weight()).norm() ** 2)
        assert gap == pytest.approx(float(s2[k:].sum()), rel=1e-4, abs=1e-12)
        assert energy_kept(m, k) == pytest.approx(1 - gap / float(s2.sum()), rel=1e-4, abs=1e-9)
    assert energy_kept(m, m.rank) == 1.0
    with pytest.raises(ValueError):
        truncate(m, 0)


def test_truncate_adapter_changes_only_the_named_modules():
    from loradeploy.quant.rank import truncate_adapter

    adapter = prune(read_adapter(EXAMPLE_ADAPTERS / "increlora"))[0]
    name = next(n for n, m in adapter.modules.items() if m.rank > 1)
    out = truncate_adapter(adapter, {name: 1})
    assert out.modules[name].rank == 1
    assert all(out.modules[n] is m for n, m in adapter.modules.items() if n != name)
    assert truncate_adapter(adapter, None) is adapter


def _correlated_gram(width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(800, 5, generator=g, dtype=torch.float64) @ torch.randn(5, width, generator=g, dtype=torch.float64)
    x = x + 0.05 * torch.randn(800, width, generator=g, dtype=torch.float64)
    return x, x.T @ x


def test_output_aware_decomposition_at_full_rank_reproduces_delta_w(modules):
    """ΔW = U Σ (Vᵀ L⁻¹) to 1e-6 relative: the whitened factors cut at the module's own rank."""

    for m in modules[:6]:
        _, gram = _correlated_gram(m.in_features)
        u, s, right = decompose(m, gram)
        d = m.delta_weight()
        assert ((u * s) @ right - d).norm() / d.norm() < 1e-6, m.name
        assert truncate(m, m.rank, gram) is m
        assert energy_kept(m, m.rank, gram) == 1.0


def test_output_aware_truncation_has_less_output_error_than_plain(modules):
    """On correlated inputs X, the rank-k truncation of ΔW·L leaves less output error
    ‖X (ΔW_k − ΔW)ᵀ‖ than the plain SVD's (summed over the modules, every k < r)."""
    plain = aware = 0.0
    for m in [m for m in modules if m.rank > 1][:6]:
        x, gram = _correlated_gram(m.in_features, seed=1)
        d = m.delta_weight()
        parts_plain, parts_aware = decompose(m), decompose(m, gram)
        for k in range(1, m.rank):
            plain += float((x @ (truncate(m, k, parts=parts_plain).delta_weight() - d).T).norm() ** 2)
            aware += float((x @ (truncate(m, k, parts=parts_aware).delta_weight() - d).T).norm() ** 2)
    assert aware < 0.9 * plain
