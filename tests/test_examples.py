"""The shipped example adapters (examples/adapters): detected, pruned exactly, reloaded by
PEFT with the reference outputs, and reproducing the accuracy their training reported."""

import copy
import json

import numpy as np
import pytest
import torch

from loradeploy.adapters import peft as peft_format
from loradeploy.adapters import read_adapter
from loradeploy.base import load_tokenizer, load_torch_model
from loradeploy.evaldata import load_eval
from loradeploy.ir import Method, Task
from loradeploy.prune import prune
from loradeploy.reference import reference_outputs
from tests.support.exactness import assert_exact
from tests.support.paths import EXAMPLE_ADAPTERS

EXAMPLES = {"sora": Method.SORA, "increlora": Method.INCRELORA, "blora": Method.BLORA}
MAX_BYTES = 5 * 2**20


@pytest.fixture(scope="module")
def base_model(minilm_dir):
    return load_torch_model(minilm_dir, Task.SEQUENCE_CLASSIFICATION, num_labels=2)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_adapter_is_small_and_detected(name):
    folder = EXAMPLE_ADAPTERS / name
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < MAX_BYTES
    adapters = read_adapter(folder)
    assert adapters.method is EXAMPLES[name]
    assert adapters.task is Task.SEQUENCE_CLASSIFICATION and adapters.num_labels == 2


@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_adapter_prunes_exactly(name):
    original = read_adapter(EXAMPLE_ADAPTERS / name)
    pruned, report = prune(original)
    assert_exact(original, pruned)
    assert report.rank_after < report.rank_before  # the method did zero ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_shipped_adapter_reproduces_training_and_reloads_in_peft(name, base_model, tokenizer, tmp_path):
    from peft import PeftModel

    eval_set = load_eval()
    original = read_adapter(EXAMPLE_ADAPTERS / name)
    ref = reference_outputs(base_model, original, Task.SEQUENCE_CLASSIFICATION, tokenizer, eval_set.texts)
    accuracy = float((ref.argmax(-1) == np.asarray(eval_set.labels)).mean())
    log = json.loads((EXAMPLE_ADAPTERS / name / "train_log.json").read_text())
    assert accuracy == pytest.approx(log["eval_accuracy"], abs=1 / len(eval_set.texts))

    pruned, _ = prune(original)
    peft_format.write(pruned, tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path)).eval()
    enc = tokenizer(eval_set.texts[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).logits.numpy()
    assert np.abs(got - ref[:64]).max() < 1e-4
