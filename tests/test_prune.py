"""Exact pruning: ΔW of every module is unchanged within 1e-6 · max|ΔW|."""

import pytest
import torch

from loradeploy.adapters import read_adapter
from loradeploy.errors import LoradeployError
from loradeploy.ir import AdapterSet, LoraModule, Method
from loradeploy.prune import PruneConfig, prune
from tests.support.exactness import assert_exact
from tests.support.synthetic import DEAD_MODULE, make_blora, make_increlora, make_sora

BUILDERS = {"sora": make_sora, "increlora": make_increlora, "blora": make_blora}


@pytest.mark.parametrize("method", BUILDERS)
def test_synthetic_pruning_is_exact(tmp_path, method):
    syn = BUILDERS[method](tmp_path / method)
    original = read_adapter(syn.path)
    pruned, report = prune(original)
    assert_exact(original, pruned)
    assert report.exact
    for name, live in syn.live_ranks.items():
        if live == 0:
            assert name not in pruned.modules
        else:
            assert pruned.modules[name].rank == live
            assert pruned.modules[name].gate is None and pruned.modules[name].rank_mask is None
    assert report.dropped_modules == [DEAD_MODULE]
    assert report.bytes_after < report.bytes_before
    assert pruned.extra_tensors.keys() == original.extra_tensors.keys()


def test_zero_rows_and_columns_are_pruned_too():
    A = torch.randn(4, 8)
    B = torch.randn(6, 4)
    A[1] = 0.0
    B[:, 2] = 0.0
    m = LoraModule("x", A, B, 0.5)
    pruned, report = prune(AdapterSet(Method.PEFT_LORA, {"x": m}))
    assert pruned.modules["x"].rank == 2
    torch.testing.assert_close(pruned.modules["x"].delta_weight(), m.delta_weight())


def test_nothing_to_prune_returns_input():
    m = LoraModule("x", torch.randn(3, 8), torch.randn(5, 3), 2.0)
    adapters = AdapterSet(Method.PEFT_LORA, {"x": m})
    pruned, report = prune(adapters)
    assert pruned is adapters and report.rank_after == 3


def test_a_subnormal_gate_prunes_without_an_internal_error():
    """A gate of 2e-43 (a fuzzed checkpoint) makes ΔW subnormal rounding noise: pruning keeps the
    rank and reports it exact, rather than tripping its own ΔW check (an exit-3 "bug")."""
    g = torch.Generator().manual_seed(0)
    gate = torch.tensor([0.7, 2e-43, 0.0, 1.3])
    m = LoraModule("x", torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g), 1.0, gate=gate)
    subnormal = LoraModule("y", torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g), 1.0,
                           gate=torch.tensor([2e-43, 0.0, 0.0, 0.0]))
    pruned, report = prune(AdapterSet(Method.SORA, {"x": m, "y": subnormal}))
    assert report.exact and pruned.modules["x"].rank == 3 and pruned.modules["y"].rank == 1


def test_all_zero_adapter_is_an_error():
    m = LoraModule("x", torch.randn(3, 8), torch.randn(5, 3), 2.0, gate=torch.zeros(3))
    with pytest.raises(LoradeployError, match="ΔW = 0"):
        prune(AdapterSet(Method.SORA, {"x": m}))


def test_increlora_reserve_kept_unless_tolerance(tmp_path):
    """Before the budget is reached, reserve E = 1e-5 is not zero: kept exactly; a tolerance
    drops it and reports the (tiny) ΔW norm dropped."""
    syn = make_increlora(tmp_path / "inc", reserve=1e-5)
    original = read_adapter(syn.path)
    pruned, report = prune(original)
    assert_exact(original, pruned)
    live = {m.name: m.rank_after for m in report.modules}
    assert live == syn.live_ranks
    pruned_tol, report_tol = prune(original, PruneConfig(tolerance=1e-3))
    assert report_tol.rank_after == report.rank_after - (len(syn.live_ranks) - 1)
    dropped = max(m.dropped_norm for m in report_tol.modules if m.rank_after)
    assert 0 < dropped < 1e-3


def test_tolerance_must_be_a_fraction():
    with pytest.raises(ValueError):
        PruneConfig(tolerance=1.5)
