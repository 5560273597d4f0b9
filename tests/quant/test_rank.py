"""SVD rank truncation (loradeploy.quant.rank) on the shipped examples' real modules."""

import pytest
import torch

from loradeploy.adapters import read_adapter
from loradeploy.prune import prune
from loradeploy.quant.rank import energy_kept, spectrum, truncate
from tests.conftest import EXAMPLE_ADAPTERS


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
