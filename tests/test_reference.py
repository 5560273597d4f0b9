"""reference: the base alone's outputs kept between adapters of one base are exactly the whole
forward's; batches of similar lengths give each text its own outputs, in the texts' order."""

import copy
import dataclasses

import numpy as np

from loradeploy.adapters import ReadOptions, read_adapter
from loradeploy.base import load_tokenizer, load_torch_model
from loradeploy.evaldata import load_eval
from loradeploy.ir import Task
from loradeploy.merge import load_extras
from loradeploy.evaldata import length_order
from loradeploy.reference import _BaseFeatures, batches, model_outputs
from tests.support.paths import EXAMPLE_ADAPTERS


def test_base_alone_from_kept_features_equals_the_whole_forward(minilm_dir):
    adapters = [read_adapter(EXAMPLE_ADAPTERS / "sora", None, ReadOptions(head=EXAMPLE_ADAPTERS / "sora" / "head.safetensors")),
                read_adapter(EXAMPLE_ADAPTERS / "increlora"), read_adapter(EXAMPLE_ADAPTERS / "blora")]
    model = load_torch_model(minilm_dir, Task.SEQUENCE_CLASSIFICATION, adapters[0].num_labels)
    tokenizer = load_tokenizer(minilm_dir)
    texts = load_eval().texts[:70]  # three batches, the last one short
    kept = _BaseFeatures()
    outs = []
    for a in adapters:
        got = kept.outputs(model, a, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts)
        whole = copy.deepcopy(model)
        load_extras(whole, a)
        assert np.array_equal(got, model_outputs(whole, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts))
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # each adapter's own head
    # other texts, or another base model object: computed again, not taken from the kept ones
    other = kept.outputs(model, adapters[1], Task.SEQUENCE_CLASSIFICATION, tokenizer, texts[:5])
    whole = copy.deepcopy(model)
    load_extras(whole, adapters[1])
    assert np.array_equal(other, model_outputs(whole, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts[:5]))
    twin = copy.deepcopy(model)
    with __import__("torch").no_grad():
        twin.bert.embeddings.word_embeddings.weight.mul_(1.01)
    changed = kept.outputs(twin, adapters[1], Task.SEQUENCE_CLASSIFICATION, tokenizer, texts[:5])
    assert np.abs(changed - other).max() > 1e-4
    # an adapter carrying a non-head tensor is not served from the features
    ln = "bert.encoder.layer.0.output.LayerNorm.weight"
    norm = dataclasses.replace(adapters[1], extra_tensors={**adapters[1].extra_tensors,
                                                           ln: dict(model.named_parameters())[ln].detach() * 1.1})
    assert kept.outputs(model, norm, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts) is None
    # the kept features were taken in length order and are given back in text order
    assert kept._features is not None and not np.array_equal(kept._features[2], np.arange(len(texts)))


def test_length_ordered_batches_pad_less_and_keep_each_texts_outputs(minilm_dir):
    import torch

    model = load_torch_model(minilm_dir, Task.SEQUENCE_CLASSIFICATION, 2)
    tokenizer = load_tokenizer(minilm_dir)
    texts = load_eval().texts[:100]
    order = length_order(tokenizer, texts)
    padded = sum(ids.size for ids, _ in batches(tokenizer, texts, order))
    in_order = sum(ids.size for ids, _ in batches(tokenizer, texts, np.arange(len(texts))))
    real = sum(int(mask.sum()) for _, mask in batches(tokenizer, texts, order))
    assert real <= padded < 0.9 * in_order, (real, padded, in_order)
    got = model_outputs(model, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts)
    with torch.no_grad():  # each text alone, no padding: its row, in the texts' order
        alone = np.concatenate([model(**{k: torch.from_numpy(v) for k, v in zip(("input_ids", "attention_mask"),
                                                                                 next(batches(tokenizer, [t])))}).logits.numpy()
                                for t in texts[::7]])
    assert np.abs(got[::7] - alone).max() < 1e-4
