"""The joint order's error model on MiniLM with the shipped SoRA adapter."""

import pytest

from loradeploy.ir import Task
from loradeploy.quant.evaluator import Evaluator
from loradeploy.quant.plan import uniform_formats

pytestmark = pytest.mark.slow


def test_module_gain_is_measured_with_nearest_codes(sora_setup):
    """A module's gain (model error per squared output error) comes from a forward pass with its
    tensors at their lowest formats and *nearest* codes, whatever codes the plan stores: with
    output-aware codes that pass can sit at the measure's float noise (sora-gemma's q4_0 modules),
    which made every gain 0. The gain is the same from an output-aware and a nearest evaluator,
    and positive."""
    from loradeploy.quant.plan import tensor_key
    from loradeploy.quant.joint_order import module_gain as _gain
    from loradeploy.quant.search import MEASURES

    entry, model, batches = sora_setup
    measure = MEASURES[Task.SEQUENCE_CLASSIFICATION]
    name = sorted(entry.pruned.modules)[0]
    gains = []
    for rounding in (True, False):
        ev = Evaluator(model, entry.pruned, "onnxruntime", Task.SEQUENCE_CLASSIFICATION, batches[:1], rounding=rounding)
        top = uniform_formats(entry.pruned, "onnxruntime", "fp32")
        lowest = {**top, tensor_key(name, "lora_A"): "int4", tensor_key(name, "lora_B"): "int4"}
        gains.append(_gain(ev, name, lowest, measure, ev.error(top)[measure]))
        assert ev.layer_error(name, "int4", "int4", rounding=True) < ev.layer_error(name, "int4", "int4", rounding=False)
    assert gains[0] == pytest.approx(gains[1], rel=1e-6) and gains[0] > 0
