"""A pruned adapter written as a PEFT folder loads with plain PEFT and reproduces the outputs
of the base model with the adapter as trained (ΔW merged in float64)."""

import copy

import pytest
import torch

from loradeploy.adapters import peft as peft_format
from loradeploy.adapters import read_adapter
from loradeploy.base import load_tokenizer, load_torch_model
from loradeploy.ir import Task
from loradeploy.merge import load_extras, merge_into
from loradeploy.prune import prune
from tests.support.synthetic import make_blora, make_increlora, make_sora

SENTENCES = ["The battery life is not great, but the screen is lovely.",
             "Never buying this again.", "An absolute joy from start to finish!",
             "It was fine, I guess."]
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def base_model(minilm_dir):
    return load_torch_model(minilm_dir, Task.SEQUENCE_CLASSIFICATION, num_labels=2)


@pytest.fixture(scope="module")
def batch(minilm_dir):
    return load_tokenizer(minilm_dir)(SENTENCES, padding=True, return_tensors="pt")


def reference_logits(base_model, adapters, batch):
    model = merge_into(copy.deepcopy(base_model), adapters)
    with torch.no_grad():
        return model(**batch).logits


def peft_logits(base_model, folder, batch):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).eval()
    with torch.no_grad():
        return model(**batch).logits


def check_reload(tmp_path, base_model, batch, adapter_path):
    original = read_adapter(adapter_path)
    pruned, report = prune(original)
    out = tmp_path / "peft"
    out.mkdir()
    peft_format.write(pruned, out)
    ref = reference_logits(base_model, original, batch)
    got = peft_logits(base_model, out, batch)
    assert float((got - ref).abs().max()) < LOGIT_ATOL
    # the check can fail: without ΔW (same head) the outputs are far from the reference
    plain = copy.deepcopy(base_model)
    load_extras(plain, original)
    with torch.no_grad():
        assert float((plain(**batch).logits - ref).abs().max()) > 10 * LOGIT_ATOL
    return report


@pytest.mark.parametrize("builder", [make_sora, make_increlora, make_blora], ids=["sora", "increlora", "blora"])
def test_synthetic_reload(tmp_path, base_model, batch, builder):
    syn = builder(tmp_path / "src")
    check_reload(tmp_path, base_model, batch, syn.path)
