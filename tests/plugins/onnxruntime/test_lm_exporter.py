"""ONNX causal-LM export (onnxruntime-genai's builder + LoRA slots): tiny Llama / Qwen2 / Qwen3 /
Gemma 3 models against their PyTorch references, per-module ranks, A/B serving, bad input; the
Gemma 3 270M base in the slow tier, loaded by onnxruntime-genai itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loradeploy import runtime
from loradeploy.cli import main
from loradeploy.job import AdapterSpec
from tests.support.og_greedy import og_greedy
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS, REPO
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters
from tests.support.serving import serve_with_arm_swaps
from tests.support import tiny_lm

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test of the decoder",
         "lorem ipsum dolor sit amet, consectetur", "a b c d e f g h i j k l m n o p"]


def _eval(folder: Path) -> Path:
    path = folder / "eval.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _torch_model(base: Path, adapter: Path | None):
    """The fp32 reference: the base with ``adapter`` merged by PEFT itself."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


_EXPORTS: dict[str, tuple] = {}


def _family_export(family: str, tmp_path_factory):
    """A tiny ``family`` base, two PEFT adapters (a: every projection; b: three of one layer) and
    their swappable onnx-cpu artifact; exported once per test session."""
    if family not in _EXPORTS:
        root = tmp_path_factory.mktemp(family)
        base = tiny_lm.build(root / "hf", family)
        adapters = {"a": tiny_lm.peft_adapter(root / "a", base, seed=1),
                    "b": tiny_lm.peft_adapter(root / "b", base, seed=2, modules=tiny_lm.PROJECTIONS[:3], layers=[1])}
        manifest = export_adapters(str(base), [AdapterSpec(n, p) for n, p in adapters.items()],
                                   str(quick_profile(root, "onnx-cpu")), root / "art", mode="swappable",
                                   eval_path=_eval(root))
        _EXPORTS[family] = (family, base, adapters, root / "art", manifest)
    return _EXPORTS[family]


@pytest.fixture(params=tiny_lm.FAMILIES)
def family_art(request, tmp_path_factory):
    return _family_export(request.param, tmp_path_factory)


@pytest.fixture
def llama_art(tmp_path_factory):
    return _family_export("llama", tmp_path_factory)


def test_swappable_decoder_equals_the_pytorch_reference(family_art):
    family, base, adapters, art, manifest = family_art
    assert manifest["validation"]["passed"], manifest["validation"]["checks"]
    metrics = manifest["validation"]["metrics"]
    for label in ("a", "b", "base alone"):
        assert metrics[label]["kl_mean"] < 1e-6 and metrics[label]["top1_agreement"] == 1.0
    assert metrics["a"]["greedy_match"] == metrics["b"]["greedy_match"] == 1.0  # 32 greedy tokens, 4 prompts
    # the adapters change the outputs (the LoRA inputs are wired in)
    assert abs(metrics["a"]["ppl_reference"] - metrics["base alone"]["ppl_reference"]) > 0.5
    tok = tiny_lm.tokenizer()
    with runtime.open(art) as session:
        for name in (None, "a", "b"):
            model = _torch_model(base, adapters[name] if name else None)
            for text in TEXTS[:2]:
                ids = tok(text)["input_ids"]
                assert session.tokenize(text) == ids
                with torch.no_grad():
                    ref = model(torch.tensor([ids])).logits[0].numpy()
                assert np.abs(session.logits(ids, name) - ref).max() < 1e-4, (family, name)
            # incremental decoding through the KV cache: greedy tokens equal PyTorch's
            ids = tok(TEXTS[0])["input_ids"]
            with torch.no_grad():
                want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None)[0, len(ids):].tolist()
            got = session.generate(TEXTS[0], adapter=name, max_new_tokens=12)
            assert got.prompt_tokens == len(ids) and got.adapter == name
            assert got.tokens == want[:len(got.tokens)] and len(got.tokens) >= 1, (family, name)


def test_every_projection_has_a_slot_with_its_own_rank(family_art):
    import onnx
    import onnxruntime as ort

    _, base, adapters, art, manifest = family_art
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    slots = manifest["decisions"]["lora_slot_modules"]
    assert len(slots) == tiny_lm.LAYERS * len(tiny_lm.PROJECTIONS) == manifest["decisions"]["lora_slots"]
    ranks = set()
    for m in slots:
        a, b = inputs[f"{m}.lora_A"], inputs[f"{m}.lora_B"]
        assert a[1] == b[0] == f"rank_{m}"
        ranks.add(a[1])
    assert len(ranks) == len(slots)  # one dynamic rank axis per module
    defaults = {i.name: list(i.dims) for i in graph.initializer if i.name.endswith((".lora_A", ".lora_B"))}
    assert all(0 in d for d in defaults.values()) and len(defaults) == 2 * len(slots)
    # each module keeps the rank it was trained with (rank_pattern), no padding to the largest
    pattern = json.loads((adapters["a"] / "adapter_config.json").read_text())["rank_pattern"]
    params = ort.AdapterFormat.read_adapter(str(art / "adapters" / "a.onnx_adapter")).get_parameters()
    assert {n.removesuffix(".lora_A"): v.shape()[1] for n, v in params.items() if n.endswith(".lora_A")} == pattern
    assert len(set(pattern.values())) > 3
    small = ort.AdapterFormat.read_adapter(str(art / "adapters" / "b.onnx_adapter")).get_parameters()
    assert len(small) == 2 * 3  # adapter b: three modules of one layer, the other slots stay empty


def test_lm_artifact_serves_ab_arms_across_threads_with_swaps(llama_art):
    """Every routed answer (last-position logits) equals the validated session's for the arm's
    adapter, from 4 threads while the arms are swapped over and over."""
    _, _, _, art, _ = llama_art
    validated = runtime.open(art)
    session = runtime.open(art)
    requests = [session.encode([t]) for t in TEXTS]
    expected = {n: [validated.run(r, n).outputs[0] for r in requests] for n in (None, "a", "b")}
    for i in range(len(TEXTS)):
        assert min(np.abs(expected[x][i] - expected[y][i]).max() for x, y in (("a", "b"), ("a", None), ("b", None))) > 1e-2
    by_fp = {session.info(n).fingerprint: n for n in session.adapters}
    paths = {n: art / "adapters" / f"{n}.onnx_adapter" for n in ("a", "b")}
    router = runtime.ABRouter(session, {"x": paths["a"], "y": paths["b"], "base": None})
    failures, swaps = serve_with_arm_swaps(router, requests, expected, by_fp, {"x": "a", "y": "b", "base": None},
                                           {"x": paths["a"], "y": paths["b"]}, threads=4, per_thread=15, atol=1e-5)
    assert failures == [] and swaps > 2 and router.snapshot()["requests"] == 60
    # generation with an adapter while it is being served equals the validated session's
    assert session.generate(TEXTS[1], "a", 8).tokens == validated.generate(TEXTS[1], "a", 8).tokens
    validated.close()
    session.close()


def test_adapters_load_into_artifacts_exported_for_other_adapters(llama_art, tmp_path):
    """Slots are the base's: adapter a (every projection) loads into an artifact exported with
    adapter b alone (three modules of one layer) and answers as in a's own artifact. With
    ``--slots adapters`` that artifact takes slots only where b has modules and refuses a, naming
    what does not fit."""
    from loradeploy.errors import BaseModelError

    _, base, adapters, art, _ = llama_art
    ids = tiny_lm.tokenizer()(TEXTS[0])["input_ids"]
    with runtime.open(art) as own:
        want = {n: own.logits(ids, n) for n in ("a", "b")}
    profile = str(quick_profile(tmp_path, "onnx-cpu"))
    for slots, n_slots in ((None, tiny_lm.LAYERS * len(tiny_lm.PROJECTIONS)), ("adapters", 3)):
        out = tmp_path / f"b-{slots}"
        rec = export_adapters(str(base), [AdapterSpec("b", adapters["b"])], profile, out, mode="swappable",
                              eval_path=_eval(tmp_path), slots=slots)
        assert rec["decisions"]["lora_slots"] == n_slots
        with runtime.open(out) as session:
            assert np.abs(session.logits(ids, "b") - want["b"]).max() < 1e-5
            if slots is None:
                session.load_adapter("a2", art / "adapters" / "a.onnx_adapter")
                assert np.abs(session.logits(ids, "a2") - want["a"]).max() < 1e-5
                assert np.abs(want["a"] - want["b"]).max() > 1e-2
            else:
                with pytest.raises(BaseModelError, match=r"model.layers.0.\S+ is not an input of this graph \(and \d+ more\)"):
                    session.load_adapter("a2", art / "adapters" / "a.onnx_adapter")


def test_ab_command_on_an_lm_artifact(llama_art, tmp_path, capsys):
    _, _, _, art, _ = llama_art
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    code = main(["ab", str(art), "--arm", "x=a", "--arm", "y=-", "--inputs", str(inputs), "--max-new-tokens", "6",
                 "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["requests"] == len(TEXTS)
    with runtime.open(art) as session:  # each request's answer: its arm's greedy continuation
        want = {arm: [session.generate(t, adapter, 6) for t in TEXTS] for arm, adapter in (("x", "a"), ("y", None))}
    served = record["served"]
    assert [(r["answer"]["tokens"], r["answer"]["text"]) for r in served] == [
        (want[r["arm"]][i].tokens, want[r["arm"]][i].text) for i, r in enumerate(served)]
    same = [want["x"][i].tokens == want["y"][i].tokens for i in range(len(TEXTS))]
    assert record["agreement"] == pytest.approx(sum(same) / len(TEXTS)) and not all(same)
    assert {a: s["requests"] for a, s in record["arms"].items()} == {a: sum(r["arm"] == a for r in served) for a in "xy"}


def test_merged_and_int4_decoders(tmp_path, capfd):
    """Merged: the adapter folded before the build equals PyTorch + PEFT's merge. int4: the base's
    projections become MatMulNBits, the LoRA inputs stay fp32, and the artifact is smaller."""
    import onnx

    base = tiny_lm.build(tmp_path / "hf", "qwen3")
    adapter = tiny_lm.peft_adapter(tmp_path / "a", base)
    ev = _eval(tmp_path)
    merged = export_adapters(str(base), [AdapterSpec("a", adapter)], str(quick_profile(tmp_path, "onnx-cpu")),
                             tmp_path / "merged", mode="merged", eval_path=ev)
    assert merged["validation"]["metrics"]["merged"]["kl_mean"] < 1e-6
    graph = onnx.load(str(tmp_path / "merged" / "model.onnx"), load_external_data=False).graph
    assert not [i.name for i in graph.input if "lora" in i.name]
    model, ids = _torch_model(base, adapter), tiny_lm.tokenizer()(TEXTS[2])["input_ids"]
    with runtime.open(tmp_path / "merged") as session, torch.no_grad():
        assert np.abs(session.logits(ids) - model(torch.tensor([ids])).logits[0].numpy()).max() < 1e-4
    int4 = export_adapters(str(base), [AdapterSpec("a", adapter)], str(quick_profile(tmp_path, "onnx-cpu-int4")),
                           tmp_path / "int4", mode="swappable", eval_path=ev)
    assert "MatMulNBits" in int4["decisions"]["quantized_ops"] and int4["decisions"]["lora_precision"] == {"fp32": 2 * 7 * tiny_lm.LAYERS}
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == tiny_lm.LAYERS * 5 + 1  # qkv packed, o, gate, up, down; + lm_head
    # the k-quant search: asymmetric blocks, each with its zero point (round to nearest had none)
    assert "algo_config=k_quant" in int4["decisions"]["builder_options"]
    assert all(len(n.input) >= 4 and n.input[3] for n in nbits), [list(n.input) for n in nbits[:2]]
    assert "WARNING" not in capfd.readouterr().err  # the builder's logging stays in its own log
    assert int4["validation"]["artifact_bytes"] < merged["validation"]["artifact_bytes"]


def test_chunked_k_quant_gives_onnxruntimes_arrays_bit_for_bit():
    from onnxruntime.quantization.neural_compressor import weight_only

    from loradeploy.plugins.onnxruntime.lm_exporter import K_QUANT_CHUNK, chunked_k_quant

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, K_QUANT_CHUNK * 5 // 6 + 7)) * 0.02).astype(np.float32)  # 3 chunks, the last short
    w[:, :40] = 0.5  # blocks with one value (the search's min == max branch)
    want = weight_only.quant_tensor_k_quant_cpu(w.T, 4, 32)
    with chunked_k_quant():
        assert weight_only.quant_tensor_k_quant_cpu is not want  # patched while building
        got = weight_only.quant_tensor_k_quant_cuda(w.T, 4, 32)  # the builder's entry point
    assert weight_only.quant_tensor_k_quant_cpu.__name__ == "quant_tensor_k_quant_cpu"
    assert [x.shape for x in got] == [x.shape for x in want] and want[0].shape[0] > 2 * K_QUANT_CHUNK
    assert all(np.array_equal(g, x) and g.dtype == x.dtype for g, x in zip(got, want))


# -- bad input: one line, exit 2, nothing written ------------------------------------------

def _cli_refuses(capsys, out: Path, argv: list[str], *needles: str) -> None:
    main_bad_input(capsys, argv, *needles)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_lm_inputs_are_refused(tmp_path, capsys):
    base = tiny_lm.build(tmp_path / "hf", "llama")
    ev = _eval(tmp_path)
    out = tmp_path / "out"
    common = ["--target", "onnx-cpu", "--eval", str(ev), "-o", str(out)]
    # an adapter for another base: hidden size 96, this base's is 64
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    wrong = tiny_lm.peft_adapter(tmp_path / "wrong", other)
    _cli_refuses(capsys, out, ["export", "--base", str(base), "--adapter", str(wrong), *common], str(wrong))
    # an adapter on a module the decoder graph does not expose (the LM head)
    from safetensors.torch import save_file

    head = tmp_path / "head"
    head.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(259, 4)}, str(head / "adapter_model.safetensors"))
    (head / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
                                                          "lora_alpha": 8, "target_modules": ["lm_head"]}))
    _cli_refuses(capsys, out, ["export", "--base", str(base), "--adapter", str(head), "--mode", "swappable", *common],
                 "lm_head", "not a projection of the decoder graph")
    # a base folder without weights
    empty = tmp_path / "noweights"
    empty.mkdir()
    for f in base.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, empty / f.name)
    good = tiny_lm.peft_adapter(tmp_path / "good", base)
    _cli_refuses(capsys, out, ["export", "--base", str(empty), "--adapter", str(good), *common], str(empty))
    # an architecture the decoder path does not export
    import transformers

    opt = tmp_path / "opt"
    transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=259, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                       num_attention_heads=4, word_embed_proj_dim=64)).save_pretrained(opt)
    tiny_lm.tokenizer().save_pretrained(opt)
    save_file({"base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64),
               "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2)},
              str(tmp_path / "opt-adapter.safetensors"))
    opt_adapter = tmp_path / "opt-adapter"
    opt_adapter.mkdir()
    shutil.move(tmp_path / "opt-adapter.safetensors", opt_adapter / "adapter_model.safetensors")
    (opt_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                                                                 "lora_alpha": 4, "target_modules": ["q_proj"]}))
    _cli_refuses(capsys, out, ["export", "--base", str(opt), "--adapter", str(opt_adapter), *common],
                 "OPTForCausalLM", "cannot be exported to ONNX as a decoder")


# -- Gemma 3 270M: onnxruntime-genai loads the artifact (slow) ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("profile", ["onnx-cpu-int4", "onnx-cpu-gguf"])
def test_onnxruntime_genai_generates_with_the_adapter(tmp_path, profile):
    """``og.Model(OUT)`` + ``og.Adapters(model).load(...)`` + ``set_active_adapter`` generate the
    same greedy tokens as loradeploy's session with the adapter; without it, the base's."""
    import onnxruntime_genai as og

    lines = (REPO / "loradeploy" / "data" / "gemma_text" / "eval.txt").read_text()
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(lines.splitlines()[:6]) + "\n")
    out = tmp_path / "art"
    manifest = export_adapters("gemma3-270m", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora-gemma")],
                               str(quick_profile(tmp_path, profile)), out, mode="swappable", eval_path=ev)
    assert manifest["decisions"]["packed_qkv"] is True
    if profile == "onnx-cpu-gguf":  # the GGUF's blocks: the base alone is as close to the reference as llama.cpp's
        assert manifest["decisions"]["transcoded_nodes"] and manifest["validation"]["passed"]
        assert manifest["validation"]["metrics"]["base alone"]["kl_mean"] < 0.01
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    adapters.load(str(out / "adapters" / "sora.onnx_adapter"), "sora")
    prompt = "The hotel room was"

    def og_generate(adapter: str | None, ids: list[int], n: int) -> list[int]:
        return og_greedy(model, adapters, ids, adapter, n)

    with runtime.open(out) as session:
        ids = session.tokenize(prompt)
        ours = {name: session.generate(prompt, name, 16).tokens for name in ("sora", None)}
    assert ours["sora"] != ours[None]
    assert og_generate("sora", ids, 16)[:len(ours["sora"])] == ours["sora"]
    assert og_generate(None, ids, 16)[:len(ours[None])] == ours[None]



@pytest.mark.slow
def test_gemma_fp32_decoder_generates_the_reference_tokens(tmp_path):
    """onnx-cpu (fp32), merged: the first 32 greedy tokens of every checked eval prompt equal the
    PyTorch reference's (the dequantized GGUF with the adapter merged), and the per-token KL is
    float noise."""
    lines = (REPO / "loradeploy" / "data" / "gemma_text" / "eval.txt").read_text()
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(lines.splitlines()[:6]) + "\n")
    manifest = export_adapters("gemma3-270m", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora-gemma")],
                               str(quick_profile(tmp_path, "onnx-cpu")), tmp_path / "art", mode="merged", eval_path=ev)
    m = manifest["validation"]["metrics"]["merged"]
    assert m["greedy_match"] == 1.0 and m["kl_mean"] < 1e-3 and m["top1_agreement"] >= 0.99
    assert manifest["validation"]["passed"]


def test_precision_plans_lower_the_lm_lora_inputs(tmp_path):
    """``--plan uniform:8`` / ``uniform:4`` store every LoRA input of the decoder as int8 / int4
    (rebuilt in the graph); the error grows as the bits shrink and stays far above float noise."""
    import onnxruntime as ort

    base = tiny_lm.build(tmp_path / "hf", "llama")
    adapter = tiny_lm.peft_adapter(tmp_path / "a", base)
    ev = _eval(tmp_path)
    kl = {}
    for bits in (8, 4):
        m = export_adapters(str(base), [AdapterSpec("a", adapter)], str(quick_profile(tmp_path, "onnx-cpu")),
                            tmp_path / f"u{bits}", mode="swappable", eval_path=ev, plan=f"uniform:{bits}")
        assert m["decisions"]["lora_precision"] == {f"int{bits}": 2 * 7 * tiny_lm.LAYERS}
        params = ort.AdapterFormat.read_adapter(str(tmp_path / f"u{bits}" / "adapters" / "a.onnx_adapter")).get_parameters()
        assert all(n.endswith((f".int{bits}", ".scale")) for n in params)
        kl[bits] = m["validation"]["metrics"]["a"]["kl_mean"]
    assert 1e-5 < kl[8] < kl[4] / 10


def test_verify_checks_a_decoder_artifact(llama_art, tmp_path, capsys):
    """``verify`` loads the decoder (onnxruntime operators the ONNX checker does not know) and runs
    it; a changed byte in the external weights fails it."""
    _, _, _, art, _ = llama_art
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    assert main(["verify", str(copy)]) == 0, capsys.readouterr().err
    assert "loaded in onnxruntime" in capsys.readouterr().out
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert main(["verify", str(copy)]) == 1
    assert "model.onnx.data: sha256 differs" in capsys.readouterr().out


@pytest.mark.parametrize("rel", ["genai_config.json", "model.onnx.data", "adapters/a.onnx_adapter", "tokenizer.json"])
def test_a_changed_decoder_file_fails_verify_check_and_validate(llama_art, tmp_path, capsys, rel):
    """onnxruntime-genai's config, the decoder's weights, an adapter, the tokenizer: one byte
    flipped fails all three verbs with exit 1, naming the file."""
    from tests.support.tamper import assert_every_verb_fails, copy_with_flipped_byte

    _, _, _, art, _ = llama_art
    assert_every_verb_fails(copy_with_flipped_byte(art, rel, tmp_path), rel, art, capsys)
