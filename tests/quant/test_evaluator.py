"""The plan evaluator on MiniLM with the shipped SoRA adapter: kept block outputs change nothing,
and a held-out evaluator measures the codes chosen on the calibration texts."""

import pytest
import torch

from loradeploy.ir import Task
from loradeploy.quant.evaluator import Evaluator
from loradeploy.quant.plan import quantize_adapter, uniform_formats
from tests.quant.conftest import held_out_batches as _held_out_batches

pytestmark = pytest.mark.slow


def test_kept_block_outputs_change_nothing_and_skip_the_blocks_before_a_change(sora_setup):
    """Plans that change modules in the last layer, then the first, then go back to the first
    plan: the evaluator reuses the blocks before the first changed one, and blocks whose modules
    hold what they held in a plan measured before (kept by state), and gets what a fresh
    evaluator gets."""
    entry, model, batches = sora_setup
    ev = Evaluator(model, entry.pruned, "onnxruntime", Task.SEQUENCE_CLASSIFICATION, batches, rounding=False)
    first_sub = next(ev._blocks[0].children())
    calls = []
    first_sub.register_forward_hook(lambda *_: calls.append(1))
    int4 = uniform_formats(entry.pruned, "onnxruntime", "int4")
    names = sorted(entry.pruned.modules)
    last = [k for k in int4 if k.startswith(max(names, key=lambda n: ev._block_of[n]))]
    first = [k for k in int4 if k.startswith(min(names, key=lambda n: ev._block_of[n]))]
    plans = [int4, {**int4, **{k: "fp16" for k in last}}, {**int4, **{k: "fp16" for k in first}}, int4]
    got, block0_runs = [], []
    for p in plans:
        calls.clear()
        got.append(ev.error(p))
        block0_runs.append(len(calls))
    # a change in the last block only reruns it; back to the first plan, block 0 is kept from it
    assert block0_runs == [len(batches), 0, len(batches), 0]
    for p, g in zip(plans, got):
        fresh = Evaluator(model, entry.pruned, "onnxruntime", Task.SEQUENCE_CLASSIFICATION, batches, rounding=False)
        assert fresh.error(p)["mean_abs_logit"] == pytest.approx(g["mean_abs_logit"], rel=1e-9, abs=1e-12)


def test_a_held_out_evaluator_measures_the_codes_chosen_on_the_calibration_texts(sora_setup):
    """``codes_from``: output-aware int4 codes are chosen on the calibration inputs; an
    evaluator on other texts measures those codes (what ships), not codes of its own."""
    entry, model, batches = sora_setup
    cls = Task.SEQUENCE_CLASSIFICATION
    ev = Evaluator(model, entry.pruned, "onnxruntime", cls, batches)
    int4 = uniform_formats(entry.pruned, "onnxruntime", "int4")
    same_texts = Evaluator(model, entry.pruned, "onnxruntime", cls, batches, codes_from=ev)
    assert same_texts.error(int4) == ev.error(int4)
    other = _held_out_batches()
    held_out = Evaluator(model, entry.pruned, "onnxruntime", cls, other, codes_from=ev)
    own_codes = Evaluator(model, entry.pruned, "onnxruntime", cls, other)  # rounds against the held-out texts
    shipped = quantize_adapter(entry.pruned, "onnxruntime", int4, grams={n: ev.gram(n) for n in entry.pruned.modules})
    name = next(iter(entry.pruned.modules))
    assert torch.equal(held_out._dequantized(name, "lora_A", "int4").float(), shipped.simulated.modules[name].lora_A.float())
    assert held_out.error(int4)["mean_abs_logit"] != own_codes.error(int4)["mean_abs_logit"]
    assert held_out.inputs == {}  # it captures no inputs of its own
