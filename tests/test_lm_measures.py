"""Per-token LM measures on hand-made logits: the adapter's effect kept is 1 when the artifact
is its reference, 0 when it is the base alone, negative when further away; the perplexity ratio."""

import numpy as np
import pytest

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
