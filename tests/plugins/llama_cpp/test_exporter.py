"""llama.cpp target: adapter GGUFs and merged GGUFs, validated in llama.cpp (llama-cpp-python)."""

import pytest
import torch

from loradeploy.adapters import read_adapter
from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters as export
from loradeploy import runtime
from loradeploy.merge import merge_into
from loradeploy.lm_measures import lm_fidelity
from loradeploy.plugins.llama_cpp import exporter as gguf_target
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import lm_eval_head, quick_profile
from tests.support.tiny_llama_fixtures import TEXTS, fast_profile, gemma, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def _runner_logits(artifact, adapter, token_lists):
    session = runtime.open(artifact, workers=1)
    return [session.logits(t, adapter) for t in token_lists], session


def test_llama_family_qk_permutation(tmp_path, tiny):
    """The adapter on q/k of a llama model: llama.cpp's logits match PyTorch's (the HF model
    with ΔW merged) only because lora_b gets the conversion's q/k row permutation."""
    from transformers import LlamaForCausalLM

    hf, path, adapter = tiny
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    record = export(str(path), [AdapterSpec("qk", adapter)], fast_profile(tmp_path, "gguf-cpu", precision="f32"),
                    tmp_path / "art", eval_path=eval_file)
    assert record["decisions"]["qk_permuted"] is True
    m = record["validation"]["metrics"]["qk"]
    assert m["top1_agreement"] >= 0.99 and m["kl_mean"] < 1e-3

    model = merge_into(LlamaForCausalLM.from_pretrained(hf).eval(), read_adapter(adapter))
    tokens = [2, 10, 20, 30, 40, 50]
    logits, _ = _runner_logits(tmp_path / "art", "qk", [tokens])
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ok = lm_fidelity([(ref, logits[0], tokens)])
    assert ok["kl_mean"] < 1e-3 and ok["top1_agreement"] == 1.0

    # negative control: without the permutation llama.cpp computes something else
    original = gguf_target.PERMUTED_QK_ARCHS
    gguf_target.PERMUTED_QK_ARCHS = set()
    try:
        bad = export(str(path), [AdapterSpec("qk", adapter)], fast_profile(tmp_path, "gguf-cpu", precision="f32"),
                     tmp_path / "bad", eval_path=eval_file)
    finally:
        gguf_target.PERMUTED_QK_ARCHS = original
    assert bad["validation"]["metrics"]["qk"]["kl_mean"] > 100 * max(m["kl_mean"], 1e-6)


def test_gemma_adapters_switch_on_one_model(gemma_pair_art):
    """Two Gemma adapters in one artifact, switched without reloading the model: each gives
    its own reference's logits (mean KL ≤ 0.02 at F16, KL no more than 0.005 above the base
    alone's, top-1 within 5 points of the base alone's: see targets/gguf-cpu.yaml)."""
    art, record = gemma_pair_art
    metrics = record["validation"]["metrics"]
    for name in ("sora", "increlora"):
        assert metrics[name]["kl_mean"] <= 0.02
        assert metrics[name]["top1_drop_vs_base"] <= 0.05 and metrics[name]["kl_excess_vs_base"] <= 0.005
    assert record["validation"]["passed"]
    # the adapters differ, so a mix-up would show
    session = runtime.open(art, workers=1)
    toks = session.tokenize(TEXTS[0])
    a, b = session.logits(toks, "sora"), session.logits(toks, "increlora")
    assert lm_fidelity([(a, b, toks)])["kl_mean"] > 10 * metrics["sora"]["kl_mean"]


def test_gemma_merged_gguf(tmp_path):
    """Merged: adapted tensors dequantized, ΔW added, requantized (Q4_K → Q5_0, Q5_0 and Q8_0 to
    themselves). Re-rounding the whole tensor costs fidelity that the swappable form does not
    (measured: KL 0.05 vs 0.004); the validation reports it (on 24 of the 64 LM eval texts)."""
    record = export("gemma3-270m", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora-gemma")],
                    fast_profile(tmp_path, "gguf-cpu"), tmp_path / "merged", mode="merged",
                    eval_path=lm_eval_head(tmp_path, 24))
    types = record["decisions"]["merged_tensor_types"]
    assert types and all("->" in v for v in types.values())
    assert "Q4_K -> Q5_0" in types.values() and "Q8_0 -> Q8_0" in types.values()
    m = record["validation"]["metrics"]["merged"]
    assert m["kl_mean"] < 0.1 and m["ppl_artifact"] < 1.15 * m["ppl_reference"]
    assert m["ppl_reference"] < 0.2 * record["validation"]["metrics"]["base alone"]["ppl_reference"]  # ΔW is in


def test_planned_tensor_types_reach_llama_cpp(tmp_path, tiny):
    """A plan file mixing GGML types: the adapter GGUF holds each tensor in its planned type
    (lora_b, rank 3 after pruning, only float types), and llama.cpp computes what the plan's
    simulated adapter computes in PyTorch (the file holds exactly the values the plan measured)."""
    import json

    from transformers import LlamaForCausalLM

    from loradeploy.job import AdapterInputs, load_entries
    from loradeploy.quant.plan import Plan, quantize_adapter

    hf, path, adapter = tiny
    (entry,) = load_entries(AdapterInputs.of([AdapterSpec("qk", adapter)]))
    kinds = ["q8_0", "q5_0", "q4_0", "f16"]
    formats = {}
    for i, name in enumerate(sorted(entry.pruned.modules)):
        formats[f"{name}.lora_A"] = kinds[i % len(kinds)]
        formats[f"{name}.lora_B"] = "f16" if i % 2 else "f32"
    # and two modules truncated below their pruned rank (SVD re-factoring, a plan decision)
    truncated = sorted(entry.pruned.modules)[:2]
    ranks = {n: [entry.pruned.modules[n].rank, k + 1] for k, n in enumerate(truncated)}
    assert all(r > k for r, k in ranks.values())
    plan_file = tmp_path / "plan.json"
    Plan("llama.cpp", "gguf-cpu", {"qk": {"formats": formats, "ranks": ranks}}).save(plan_file)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")

    record = export(str(path), [AdapterSpec("qk", adapter)], fast_profile(tmp_path, "gguf-cpu"), tmp_path / "art",
                    eval_path=eval_file, plan=str(plan_file))
    types = record["decisions"]["adapter_tensor_types"]["qk"]
    assert set(types.values()) == {"Q8_0", "Q5_0", "Q4_0", "F16", "F32"}
    assert record["adapters"][0]["plan"]["formats"] == formats
    assert record["adapters"][0]["plan"]["ranks"] == ranks
    assert all(0 < e < 1 for e in record["adapters"][0]["plan"]["energy_kept"].values())
    simulated = quantize_adapter(entry.pruned, "llama.cpp", formats, {n: k for n, (_, k) in ranks.items()}).simulated
    assert [simulated.modules[n].rank for n in truncated] == [1, 2]
    model = merge_into(LlamaForCausalLM.from_pretrained(hf).eval(), simulated)
    tokens = [2, 10, 20, 30, 40, 50]
    logits, _ = _runner_logits(tmp_path / "art", "qk", [tokens])
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ok = lm_fidelity([(ref, logits[0], tokens)])
    assert ok["kl_mean"] < 1e-3 and ok["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["adapters"][0]["plan"]["method"].startswith("file:")
    # the truncation is what llama.cpp computes: the untruncated plan's simulation is farther off
    full = merge_into(LlamaForCausalLM.from_pretrained(hf).eval(), quantize_adapter(entry.pruned, "llama.cpp", formats).simulated)
    with torch.no_grad():
        far = lm_fidelity([(full(torch.tensor([tokens])).logits[0].numpy(), logits[0], tokens)])
    assert far["kl_mean"] > 10 * max(ok["kl_mean"], 1e-7)
    # the plan search's evaluator runs each LoRA path beside the base weight with its inputs
    # rounded as ggml rounds them per weight type (f16; 8-bit blocks for Q8_0/Q5_0/Q4_0): it
    # computes what llama.cpp computes far closer than the merged simulation above
    from loradeploy.ir import Task
    from loradeploy.quant.evaluator import Evaluator

    batch = {"input_ids": torch.tensor([tokens]), "attention_mask": torch.ones(1, len(tokens), dtype=torch.long)}
    ev = Evaluator(LlamaForCausalLM.from_pretrained(hf).eval(), entry.pruned, "llama.cpp", Task.CAUSAL_LM, [batch],
                   rounding=False, truncation="plain")
    assert ev.unmerged
    (sim,) = ev.outputs(formats, {n: k for n, (_, k) in ranks.items()})
    closer = lm_fidelity([(sim.numpy(), logits[0], tokens)])
    assert closer["kl_mean"] < ok["kl_mean"] / 10, (closer, ok)


def test_norm_weights_merge_into_the_gguf_and_are_refused_as_swappable(tmp_path, gemma):
    """An LM adapter carrying RMSNorm weights: a llama.cpp adapter GGUF holds only lora_a/lora_b,
    so swappable is refused with what to do (nothing written); merged writes the norms in the
    GGUF's own convention (Gemma's converter stores weight + 1) and validates against the fp32
    reference that has them."""
    import numpy as np
    from gguf import GGUFReader

    from loradeploy.base import load_torch_model
    from loradeploy.errors import LoradeployError
    from loradeploy.ir import Task
    from tests.support.synthetic import with_layernorms

    norms = {"model.layers.0.input_layernorm": "blk.0.attn_norm.weight",
             "model.layers.17.post_feedforward_layernorm": "blk.17.post_ffw_norm.weight"}
    base_model = load_torch_model(gemma, Task.CAUSAL_LM, None)
    ln = with_layernorms(EXAMPLE_ADAPTERS / "sora-gemma", tmp_path / "ln", base_model, list(norms))
    profile = fast_profile(tmp_path, "gguf-cpu")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    with pytest.raises(LoradeployError, match=r"carries 2 tensors besides LoRA .*use --mode merged"):
        export("gemma3-270m", [AdapterSpec("ln", ln)], profile, tmp_path / "swap", mode="swappable",
               eval_path=eval_file)
    assert not (tmp_path / "swap").exists()
    record = export("gemma3-270m", [AdapterSpec("ln", ln)], profile, tmp_path / "merged", mode="merged",
                    eval_path=eval_file)
    written = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(str(tmp_path / "merged" / "model.gguf")).tensors}
    original = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(str(gemma)).tensors}
    adapter = read_adapter(ln).extra_tensors
    params = dict(base_model.named_parameters())
    for hf, g in norms.items():
        offset = original[g] - params[f"{hf}.weight"].detach().double().numpy()
        assert np.ptp(offset) < 1e-6 and abs(offset.mean() - 1.0) < 1e-6  # Gemma: stored as weight + 1
        assert np.allclose(written[g], adapter[f"{hf}.weight"].double().numpy() + 1.0, rtol=1e-6, atol=1e-6)
        assert np.abs(written[g] - original[g]).max() > 0.01
    m = record["validation"]["metrics"]["merged"]
    assert m["kl_mean"] < 0.1 and m["ppl_artifact"] < 1.15 * m["ppl_reference"]


def test_auto_mode_picks_merged_when_llama_cpp_cannot_carry_a_tensor(tmp_path, tiny):
    """auto: the swappable candidate cannot be written (a norm weight travels with the adapter),
    so merged ships; the manifest says why."""
    from loradeploy.base import load_torch_model
    from loradeploy.ir import Task
    from tests.support.synthetic import with_layernorms

    _, path, adapter = tiny
    ln = with_layernorms(adapter, tmp_path / "ln", load_torch_model(path, Task.CAUSAL_LM, None),
                         ["model.layers.0.input_layernorm"])
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    record = export(str(path), [AdapterSpec("ln", ln)], fast_profile(tmp_path, "gguf-cpu", precision="f32"),
                    tmp_path / "art", mode="auto", eval_path=eval_file)
    selection = record["decisions"]["mode_selection"]
    assert record["mode"] == selection["chosen"] == "merged"
    assert selection["candidates"]["swappable"]["exportable"] is False
    assert "lora_a/lora_b" in selection["candidates"]["swappable"]["reason"]
    assert record["validation"]["metrics"]["merged"]["kl_mean"] < 1e-3


def test_a_changed_gguf_fails_verify_check_and_validate(tmp_path, tiny, capsys):
    """The base GGUF (hard-linked from where the base lives) and the adapter GGUF: one byte
    flipped in a copy fails all three verbs with exit 1, naming the file."""
    from loradeploy.fsutil import sha256_file
    from tests.support.tamper import assert_every_verb_fails, copy_with_flipped_byte

    _, path, adapter = tiny
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    export(str(path), [AdapterSpec("qk", adapter)], str(quick_profile(tmp_path, "gguf-cpu")), tmp_path / "art",
           mode="swappable", eval_path=eval_file)
    base_sha = sha256_file(path)
    for i, rel in enumerate(["model.gguf", "adapters/qk.gguf"]):
        (tmp_path / str(i)).mkdir()
        assert_every_verb_fails(copy_with_flipped_byte(tmp_path / "art", rel, tmp_path / str(i)), rel,
                                tmp_path / "art", capsys)
    assert sha256_file(path) == base_sha  # the base itself untouched
