import torch
import pytest

from loradeploy.adapters import read_adapter
from loradeploy.ir import Method, Task
from loradeploy.adapters.checkpoint import ReadOptions
from tests.support.synthetic import make_sora


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sora_delta_matches_formula(tmp_path, fmt):
    syn = make_sora(tmp_path / "sora", fmt=fmt)
    adapters = read_adapter(syn.path)
    assert adapters.method is Method.SORA
    assert set(adapters.modules) == set(syn.delta)
    for name, expected in syn.delta.items():
        torch.testing.assert_close(adapters.modules[name].delta_weight(), expected, rtol=1e-12, atol=1e-12)
    assert adapters.task is Task.SEQUENCE_CLASSIFICATION and adapters.num_labels == 2
    assert adapters.hyperparameters["lora_alpha"] == 16.0


def test_sora_alpha_from_config_and_override(tmp_path):
    syn = make_sora(tmp_path / "s", alpha=32.0)
    assert read_adapter(syn.path).modules[next(iter(syn.delta))].scale == 32.0 / 8
    assert read_adapter(syn.path, options=ReadOptions(lora_alpha=8.0)).hyperparameters["lora_alpha"] == 8.0


def test_sora_without_config_assumes_default_and_says_so(tmp_path):
    syn = make_sora(tmp_path / "s", alpha=16.0, write_config=False, with_head=False)
    adapters = read_adapter(syn.path)
    assert adapters.hyperparameters["lora_alpha"] == 16.0
    assert any("assumed 16" in n for n in adapters.notes)
    assert any("no classifier head" in n for n in adapters.notes)
    assert adapters.task is Task.FEATURE_EXTRACTION


def test_sora_head_option(tmp_path):
    syn = make_sora(tmp_path / "s")
    (syn.path / "head.safetensors").rename(tmp_path / "my_head.safetensors")
    assert read_adapter(syn.path).task is Task.FEATURE_EXTRACTION
    adapters = read_adapter(syn.path, options=ReadOptions(head=tmp_path / "my_head.safetensors"))
    torch.testing.assert_close(adapters.extra_tensors["classifier.weight"], syn.head["classifier.weight"])
