"""benchmarks/quant_oracle.py, scaled down (32 eval texts, output-aware codes): the search fitted
on the texts it is judged on keeps a plan within the bytes, measured on those texts, never worse
than uniform int8 with nearest rounding (one of its candidates)."""

import pytest

from benchmarks import quant_oracle


@pytest.mark.slow
def test_the_oracle_plan_is_within_the_bytes_and_no_worse_than_uniform_int8():
    (row,) = quant_oracle.oracle("sora", texts=32, roundings=(True,))
    assert row["texts"] == 32 and row["rounding"] == "output-aware"
    assert row["bytes"] <= row["max_bytes"] and row["search_path_at_cap"]["bytes"] <= row["max_bytes"]
    assert 0 < row["mean_abs_logit"] <= row["uniform_int8_nearest"]
    assert row["ratio"] == pytest.approx(row["mean_abs_logit"] / row["uniform_int8_nearest"])
