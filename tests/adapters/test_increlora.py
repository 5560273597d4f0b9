import torch

from loradeploy.adapters import read_adapter
from loradeploy.ir import Method
from tests.support.synthetic import make_increlora


def test_increlora_delta_matches_formula(tmp_path):
    syn = make_increlora(tmp_path / "inc")
    adapters = read_adapter(syn.path)
    assert adapters.method is Method.INCRELORA
    for name, expected in syn.delta.items():
        torch.testing.assert_close(adapters.modules[name].delta_weight(), expected, rtol=1e-12, atol=1e-12)
    assert set(adapters.extra_tensors) == {"classifier.weight", "classifier.bias"}


def test_increlora_full_model_sets_base_tensors_aside(tmp_path, minilm_dir):
    from safetensors.torch import load_file

    base = {f"bert.{k}": v for k, v in load_file(str(minilm_dir / "model.safetensors")).items()}
    syn = make_increlora(tmp_path / "full", base_state=base)
    adapters = read_adapter(syn.path)
    assert set(adapters.extra_tensors) == {"classifier.weight", "classifier.bias"}
    assert any("base-model tensors" in n for n in adapters.notes)
    for name, expected in syn.delta.items():
        torch.testing.assert_close(adapters.modules[name].delta_weight(), expected, rtol=1e-12, atol=1e-12)
