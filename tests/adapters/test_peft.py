"""PEFT LoRA and AdaLoRA files written by PEFT itself; ΔW checked against PEFT's own layers."""

import pytest
import torch

from loradeploy.adapters import read_adapter
from loradeploy.ir import Method


def _peft_model(minilm_dir, config, seed=0):
    from peft import get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    base = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=3)
    model = get_peft_model(base, config)
    with torch.no_grad():  # make B non-zero so ΔW is not trivially 0
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_E" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def _peft_delta(model, name):
    layer = model.get_submodule("base_model.model." + name)
    return layer.get_delta_weight("default").double()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_matches_peft(tmp_path, minilm_dir, rslora):
    from peft import LoraConfig

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"],
                     rank_pattern={"bert.encoder.layer.0.attention.self.query": 4},
                     alpha_pattern={"value": 4}, use_rslora=rslora, task_type="SEQ_CLS")
    model = _peft_model(minilm_dir, cfg)
    model.save_pretrained(tmp_path / "p")
    adapters = read_adapter(tmp_path / "p")
    assert adapters.method is Method.PEFT_LORA
    assert adapters.modules["bert.encoder.layer.0.attention.self.query"].rank == 4
    for name in adapters.modules:
        torch.testing.assert_close(adapters.modules[name].delta_weight(), _peft_delta(model, name),
                                   rtol=1e-5, atol=1e-7)
    assert adapters.num_labels == 3


def test_peft_adalora_matches_peft_after_reload(tmp_path, minilm_dir):
    from peft import AdaLoraConfig, PeftModel
    from transformers import BertForSequenceClassification

    cfg = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["query", "value"],
                        total_step=10, task_type="SEQ_CLS")
    model = _peft_model(minilm_dir, cfg)
    with torch.no_grad():  # AdaLoRA's own pruning result: some E entries masked to 0
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p[::2] = 0.0
    model.save_pretrained(tmp_path / "a")
    adapters = read_adapter(tmp_path / "a")
    assert adapters.method is Method.PEFT_ADALORA
    reloaded = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=3), tmp_path / "a")
    for name, m in adapters.modules.items():
        layer = reloaded.get_submodule("base_model.model." + name)
        expected = layer.get_delta_weight("default").double()
        torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-5, atol=1e-7)
        assert int(m.live_ranks().sum()) == 3
