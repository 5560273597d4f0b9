"""Per-token LM measures on hand-made logits: the adapter's effect kept is 1 when the artifact
is its reference, 0 when it is the base alone, negative when further away; the perplexity ratio."""

import numpy as np
import pytest
import torch

from loradeploy.lm_measures import lm_fidelity


def _logits(seed: int, n: int = 6, vocab: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, vocab)) * 3


def test_adapter_effect_kept_and_perplexity_ratio():
    tokens = [1, 4, 2, 9, 0, 3]
    ref, base = _logits(0), _logits(1)
    same = lm_fidelity([(ref, ref, tokens)], [base])
    assert same["adapter_effect_kept"] == pytest.approx(1.0) and same["ppl_ratio"] == pytest.approx(1.0)
    assert lm_fidelity([(ref, base, tokens)], [base])["adapter_effect_kept"] == pytest.approx(0.0)
    assert lm_fidelity([(ref, 2 * base - ref, tokens)], [base])["adapter_effect_kept"] < 0  # moved the other way
    halfway = lm_fidelity([(ref, (ref + base) / 2, tokens)], [base])
    assert 0 < halfway["adapter_effect_kept"] < 1 and halfway["kl_mean"] > 0
    worse = lm_fidelity([(ref, ref * 0.2, tokens)])  # flatter: the reference's likely tokens lose probability
    assert "adapter_effect_kept" not in worse and worse["ppl_ratio"] == pytest.approx(
        worse["ppl_artifact"] / worse["ppl_reference"])
    # a generator of pairs, one text's logits at a time, gives what a list gives
    pairs = [(ref, (ref + base) / 2, tokens), (base, ref, tokens[:4] + [5, 6])]
    assert lm_fidelity(iter(pairs), iter([base, ref])) == lm_fidelity(pairs, [base, ref])


def test_lm_kl_is_exact_for_tiny_perturbations_and_the_cached_reference_agrees():
    """KL from logit differences in float64: a perturbation δ of 1e-4 gives ½·Var_p(δ) (~5e-9),
    which float32 log-probs could not resolve; the cached reference (entries above 1e-12) gives
    the same to 1e-6 relative."""
    from loradeploy.lm_measures import LmReference, kl_and_top1 as _lm_compare

    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(70, 32768, generator=gen) * 4, torch.randn(9, 32768, generator=gen) * 4]
    got = [r + torch.randn(r.shape, generator=gen) * 1e-4 for r in ref]
    second_order = []
    for r, g in zip(ref, got):
        p = torch.softmax(r.double(), -1)
        d = (g.double() - r.double())
        mean = (p * d).sum(-1, keepdim=True)
        second_order.append(0.5 * (p * (d - mean) ** 2).sum(-1))
    expected = float(torch.cat(second_order).mean())
    full = _lm_compare(ref, got)["kl_mean"]
    assert full == pytest.approx(expected, rel=1e-3)
    float32 = float(torch.cat([(torch.log_softmax(r, -1).exp() * (torch.log_softmax(r, -1) - torch.log_softmax(g, -1))).sum(-1)
                               for r, g in zip(ref, got)]).mean())
    assert abs(float32 - expected) > 0.1 * expected  # what the float64 form is for
    cached = LmReference(ref).compare(got)
    assert cached["kl_mean"] == pytest.approx(full, rel=1e-6)
    assert cached["top1_agreement"] == _lm_compare(ref, got)["top1_agreement"]
