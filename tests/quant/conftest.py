"""The MiniLM base with the shipped SoRA adapter and calibration batches, for the plan-search tests."""

import pytest

from loradeploy.base import load_torch_model, resolve_base
from loradeploy.ir import Task
from loradeploy.job import AdapterInputs, AdapterSpec, load_entries
from loradeploy.quant.evaluator import calibration_batches
from tests.support.paths import EXAMPLE_ADAPTERS


@pytest.fixture(scope="module")
def sora_setup():
    from loradeploy.base import load_tokenizer
    from loradeploy.evaldata import load_calibration

    (entry,) = load_entries(AdapterInputs.of([AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")]))
    base_dir = resolve_base("minilm")
    model = load_torch_model(base_dir, Task.SEQUENCE_CLASSIFICATION, 2)
    texts = load_calibration(None, 32).texts
    batches = calibration_batches(load_tokenizer(base_dir), texts, Task.SEQUENCE_CLASSIFICATION, 128)
    return entry, model, batches


def held_out_batches(n: int = 64) -> list[dict]:
    """Training texts after those :func:`sora_setup` calibrates on."""
    from loradeploy.base import load_tokenizer
    from loradeploy.evaldata import load_calibration

    texts = load_calibration(None, 32 + n).texts[32:]
    return calibration_batches(load_tokenizer(resolve_base("minilm")), texts, Task.SEQUENCE_CLASSIFICATION, 128)
