"""Causal LMs on the ExecuTorch target: a tiny Llama and a tiny Gemma 3 (sliding window 8, GELU-tanh
MLPs) each exported swappable (two PEFT adapters of
different ranks per module, padded to the rank bound) as one KV-cache program; in executorch's
runtime, both adapters and the base alone, with no reload between them, give PEFT's merged model's
logits at every position and its greedy tokens; validation's LM measures pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loradeploy import runtime
from loradeploy.job import AdapterSpec
from tests.support import tiny_lm
from tests.support.exports import export_adapters
from tests.support.profiles import quick_profile

# longer than the tiny Gemma's sliding window (8 tokens)
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test of the decoder"]
TOL = 1e-4


def _reference(base: Path, adapter: Path | None):
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_decoder(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"et-lm-{request.param}")
    base = tiny_lm.build(root / "hf", request.param)
    adapters = {"one": tiny_lm.peft_adapter(root / "one", base, seed=1),
                "two": tiny_lm.peft_adapter(root / "two", base, seed=2)}
    ev = root / "eval.txt"
    ev.write_text("\n".join(TEXTS) + "\n")
    out = root / "artifact"
    record = export_adapters(str(base), [AdapterSpec(n, p) for n, p in adapters.items()],
                             str(quick_profile(root, "executorch")), out, mode="swappable", eval_path=ev)
    return {"base": base, "adapters": adapters, "out": out, "record": record, "family": request.param}


def test_validation_passes_with_the_lm_measures(tiny_decoder):
    record = tiny_decoder["record"]
    assert record["validation"]["passed"]
    decisions = record["decisions"]
    assert decisions["rank_bound"] == 16 and decisions["lora_slots"] == tiny_lm.LAYERS * len(tiny_lm.PROJECTIONS)
    assert decisions["partition"]["xnnpack_segments"] > 0
    # every RMSNorm's mean a delegated linear (Gemma 3: 4 per layer + q/k norms; Llama: 2), the final norm too
    family = tiny_decoder["family"]
    assert decisions["rms_norms_as_linear_means"] == {"llama": 2, "gemma3": 6}[family] * tiny_lm.LAYERS + 1
    assert "aten.mean.dim" not in decisions["partition"]["portable_ops"]
    assert decisions["tanh_gelus_written_out"] == {"llama": 0, "gemma3": tiny_lm.LAYERS}[family]
    assert (tiny_decoder["out"] / "model.pte").is_file()
    assert sorted(p.name for p in (tiny_decoder["out"] / "adapters").iterdir()) == ["one.ptd", "two.ptd"]


def test_two_adapters_and_the_base_match_peft_at_every_position_and_in_greedy_tokens(tiny_decoder):
    from loradeploy.lm_measures import torch_greedy

    session = runtime.open(tiny_decoder["out"])  # the manifest's adapters loaded
    assert sorted(session.adapters) == ["one", "two"]
    method = session.method
    tokens = [session.tokenize(t) for t in TEXTS]
    # interleaved: adapter, base, other adapter, first adapter again: one program, fed other tensors
    for name in ("one", None, "two", "one"):
        ref = _reference(tiny_decoder["base"], tiny_decoder["adapters"][name] if name else None)
        for ids in tokens:
            with torch.no_grad():
                want = ref(torch.tensor([ids])).logits[0].numpy()
            got = session.logits(ids, name)
            assert got.shape == want.shape
            assert np.abs(got - want).max() < TOL, (name, float(np.abs(got - want).max()))
        prompt = tokens[0][:8]
        assert session.greedy(prompt, name, 16) == torch_greedy(ref, prompt, 16)
    assert session.method is method
    one = _reference(tiny_decoder["base"], tiny_decoder["adapters"]["one"])
    with torch.no_grad():
        moved = np.abs(one(torch.tensor([tokens[0]])).logits[0].numpy()
                       - _reference(tiny_decoder["base"], None)(torch.tensor([tokens[0]])).logits[0].numpy()).max()
    assert moved > 100 * TOL  # the adapters change the logits: matching them is not matching the base


def test_an_architecture_without_a_kv_cache_is_one_error_line(tmp_path, capsys):
    """A state-space LM (Mamba: no attention, so no static KV cache) merged with a PEFT adapter:
    exit 2, one line naming the architecture and what is missing, nothing written."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from tests.support.cli import main_bad_input

    base = tmp_path / "mamba"
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=len(tiny_lm.tokenizer()),
                                      state_size=4, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    transformers.MambaForCausalLM(config).save_pretrained(base)
    tiny_lm.tokenizer().save_pretrained(base)
    peft = get_peft_model(transformers.MambaForCausalLM.from_pretrained(str(base)),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    main_bad_input(capsys, ["export", "--base", str(base), "--adapter", f"a={tmp_path / 'adapter'}",
                            "--target", str(quick_profile(tmp_path, "executorch")), "--mode", "merged",
                            "--eval", str(ev), "-o", str(out)],
                   "MambaForCausalLM", "static KV cache")
    assert not out.exists() or not any(out.iterdir())


def test_merged_program_takes_no_factors_and_matches_peft(tmp_path):
    """--mode merged: the adapter folded in, a program with token ids and positions only."""
    import json

    base = tiny_lm.build(tmp_path / "hf", "llama")
    adapter = tiny_lm.peft_adapter(tmp_path / "one", base, seed=1)
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "merged"
    record = export_adapters(str(base), [AdapterSpec("one", adapter)], str(quick_profile(tmp_path, "executorch")),
                             out, mode="merged", eval_path=ev)
    assert record["validation"]["passed"]
    assert json.loads((out / "executorch.json").read_text())["inputs"] == [] and not (out / "adapters").exists()
    session = runtime.open(out)
    ref = _reference(base, adapter)
    ids = session.tokenize(TEXTS[1])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(session.logits(ids) - want).max() < TOL


@pytest.mark.parametrize("case", ["rank above the bound", "trained norms"])
def test_an_adapter_the_program_cannot_take_is_one_error_line_before_lowering(tmp_path, capsys, case):
    """A module of rank 8 on a profile bounding ranks at 4 names the module and the bound; an
    adapter carrying trained RMSNorm weights (the program takes LoRA factors only) names the
    tensor. Exit 2, nothing written."""
    from tests.support.cli import main_bad_input

    base = tiny_lm.build(tmp_path / "hf", "llama")
    norms = case == "trained norms"
    adapter = tiny_lm.peft_adapter(tmp_path / "a", base, seed=1, norms=norms)
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(TEXTS) + "\n")
    profile = quick_profile(tmp_path, "executorch", **({} if norms else {"rank_bound": 4}))
    out = tmp_path / "out"
    needles = ("norm.weight", "has no input in the program") if norms else ("rank 8", "rank bound 4")
    main_bad_input(capsys, ["export", "--base", str(base), "--adapter", f"a={adapter}", "--target", str(profile),
                            "--eval", str(ev), "-o", str(out)], *needles)
    assert not out.exists() or not any(out.iterdir())
