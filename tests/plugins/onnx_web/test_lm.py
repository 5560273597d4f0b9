"""onnx-web-int4: a tiny Gemma 3 LM bundle (two PEFT adapters, one with trained RMSNorms; and a tiny Llama) in
onnxruntime-web's wasm backend through the bundle's own loradeploy.mjs: the graph's rewrite for the
page, wasm logits against onnxruntime CPU on the same graph and tensors, the LM measures against
the fp32 PyTorch reference within the profile's budgets, greedy generation with the KV cache, the
JS tokenizer, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loradeploy.job import AdapterSpec
from tests.support import tiny_lm
from tests.support.cli import main_bad_input
from tests.support.exports import export_adapters
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test of the decoder",
         "Ünïcode — and numbers 1234 too"]
ADAPTERS = ("lora", "norms")
#: wasm against onnxruntime CPU on the same graph and feeds (measured: 1.8e-6 on logits of |3.7|)
TIGHT = 1e-4


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("web-lm")
    base = tiny_lm.build(root / "hf", "gemma3")
    adapters = {"lora": tiny_lm.peft_adapter(root / "lora", base, seed=1),
                "norms": tiny_lm.peft_adapter(root / "norms", base, seed=3, norms=True)}
    (root / "eval.txt").write_text("\n".join(TEXTS) + "\n")
    profile = quick_profile(root, "onnx-web-int4", warmup=0, runs=2)
    record = export_adapters(str(base), [AdapterSpec(n, adapters[n]) for n in ADAPTERS], str(profile),
                             root / "bundle", eval_path=root / "eval.txt")
    return {"root": root, "base": base, "folder": root / "bundle", "record": record, "profile": profile}


@pytest.fixture(scope="module")
def web(lm_bundle):
    from loradeploy import runtime

    with runtime.open(lm_bundle["folder"], threads=1) as session:
        yield session


def _ort_cpu(folder: Path):
    """onnxruntime CPU (1 thread) on the bundle's own model.onnx, fed what loradeploy.mjs feeds."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    config = json.loads((folder / "web.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    base = load_file(str(folder / "base.safetensors"))
    empty = {n: np.zeros([s["shape"][0], 0] if s["role"] == "lora_A" else [0, s["shape"][1]], np.float32)
             for n, s in config["slots"].items()}
    dec = config["decoder"]

    def forward(tokens, adapter, past=None):
        feeds = {**empty, **base, **(load_file(str(folder / config["adapters"][adapter])) if adapter else {})}
        past = past or [np.zeros((1, dec["kv_heads"], 0, dec["head_size"]), np.float32)] * len(dec["past"])
        feeds.update(zip(dec["past"], past))
        feeds["input_ids"] = np.asarray([tokens], np.int64)
        feeds["attention_mask"] = np.ones((1, past[0].shape[2] + len(tokens)), np.int64)
        out = session.run([dec["logits"], *dec["present"]], feeds)
        return out[0][0], out[1:]

    def greedy(tokens, adapter, n):
        logits, past = forward(tokens, adapter)
        out = []
        while True:
            out.append(int(np.argmax(logits[-1])))
            if len(out) == n:
                return out
            logits, past = forward(out[-1:], adapter, past)
    return forward, greedy


def test_the_graph_is_rewritten_for_the_page(lm_bundle):
    """One file, every LoRA slot and RMSNorm weight a plain input (no initializer behind it), every
    MatMulNBits at accuracy_level 0, the contrib operators of the genai decoder kept."""
    import onnx

    folder, decisions = lm_bundle["folder"], lm_bundle["record"]["decisions"]
    model = onnx.load(str(folder / "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    config = json.loads((folder / "web.json").read_text())
    assert not list(folder.glob("*.data")) and not list(folder.glob("*.onnx_adapter"))
    assert set(config["slots"]) | set(config["travelling"]) <= inputs
    assert len(config["slots"]) == 2 * 7 * tiny_lm.LAYERS and len(config["travelling"]) == 6 * tiny_lm.LAYERS + 1
    assert not inputs & {i.name for i in model.graph.initializer}
    levels = [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"]
    assert levels and set(levels) == {0}
    assert {"com.microsoft:GroupQueryAttention", "com.microsoft:MatMulNBits"} <= set(decisions["operators"])
    assert decisions["graph_inputs_plain"] and decisions["base_precision"] == "int4"


def test_adapter_files_hold_the_trained_tensors(lm_bundle):
    """Every module's lora_A @ lora_B in the bundle's file is PEFT's scale · (B A)ᵀ, every trained
    RMSNorm is 1 + w (Gemma's convention in the graph): the values, not only the names and shapes."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    root, folder = lm_bundle["root"], lm_bundle["folder"]
    for name in ADAPTERS:
        peft = load_torch(str(root / name / "adapter_model.safetensors"))
        ranks = json.loads((root / name / "adapter_config.json").read_text())["rank_pattern"]
        ours = load_file(str(folder / "adapters" / f"{name}.safetensors"))
        modules = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in peft if "lora_A" in k}
        assert {f"{m}.lora_{r}" for m in modules for r in "AB"} == {k for k in ours if ".lora_" in k}
        for m in modules:
            a, b = (peft[f"base_model.model.{m}.lora_{r}.weight"] for r in "AB")
            want = (16 / ranks[m] * (b @ a)).T.numpy()
            assert np.abs(ours[f"{m}.lora_A"] @ ours[f"{m}.lora_B"] - want).max() < 1e-5, m
        norms = {k.removeprefix("base_model.model."): v for k, v in peft.items() if "norm" in k}
        assert len(norms) == (6 * tiny_lm.LAYERS + 1 if name == "norms" else 0)
        for n, w in norms.items():
            assert np.abs(ours[n] - (w.numpy() + 1.0)).max() < 1e-6, n


def test_wasm_logits_match_onnxruntime_cpu_on_the_same_graph(lm_bundle, web):
    """Per-position logits of every adapter and of none: wasm (the bundle's JS) against onnxruntime
    CPU fed the same tensors, within 1e-4; the three differ from each other by far more."""
    forward, _ = _ort_cpu(lm_bundle["folder"])
    tokens = web.tokenize(TEXTS[0])
    got = {}
    for adapter in (*ADAPTERS, None):
        got[adapter] = web.logits(tokens, adapter)
        want, _ = forward(tokens, adapter)
        assert got[adapter].shape == want.shape == (len(tokens), 259)
        assert np.abs(got[adapter] - want).max() < TIGHT, adapter
    rows = web.run({"input_ids": np.asarray([tokens, [0] + tokens[:-1]]),  # Session.run: last positions
                    "attention_mask": np.asarray([[1] * len(tokens), [0] + [1] * (len(tokens) - 1)])}, "norms")
    assert np.abs(rows.outputs[0] - got["norms"][-1]).max() < TIGHT
    assert np.abs(rows.outputs[1] - web.logits(tokens[:-1], "norms")[-1]).max() < TIGHT
    pairs = [("lora", "norms"), ("lora", None), ("norms", None)]
    assert min(np.abs(got[a] - got[b]).max() for a, b in pairs) > 100 * TIGHT


def test_lm_measures_against_the_reference_are_within_the_profile_budgets(lm_bundle):
    """The export's validation (wasm logits against the fp32 PyTorch reference with PEFT's merge)
    passed, and each measure is within the onnx-web-int4 budgets; the JS tokenizer agreed; the
    browser check ran the page (where a Chromium is installed)."""
    from loradeploy.plugins.onnx_web.browser import BROWSER_ATOL, NOT_RUN, find_chromium
    from loradeploy.profile import load_profile

    validation = lm_bundle["record"]["validation"]
    budgets = load_profile(str(lm_bundle["profile"])).budgets
    assert validation["passed"]
    for name in ADAPTERS:
        m = validation["metrics"][name]
        assert m["tokens"] > 30
        assert m["kl_mean"] <= budgets.kl_mean_max and m["top1_agreement"] >= budgets.top1_agreement_min
        assert m["ppl_ratio"] <= budgets.ppl_ratio_max and m["adapter_effect_kept"] >= budgets.adapter_effect_kept_min
    assert validation["metrics"]["tokenizer"]["agreement"] == 1.0
    browser = validation["metrics"]["browser_check"]
    if find_chromium() is None:
        assert browser == {"status": NOT_RUN}
    else:  # the page's greedy tokens and last-position logits, each adapter and none, against Node's
        assert browser["status"] == "pass" and browser["max_abs_diff"] <= BROWSER_ATOL, browser
        assert sorted(browser["per_adapter"]) == sorted([*ADAPTERS, "none"])
    assert {"pp16", "tg"} <= set(validation["latency"]["shapes"])
    assert validation["latency"]["generation"]["tg_tokens_per_s"] > 0


def test_greedy_generation_in_wasm_is_onnxruntime_cpu_s(lm_bundle, web):
    """12 greedy tokens with the KV cache in wasm, each adapter and none: the tokens onnxruntime CPU
    gives on the same graph; generate() decodes them with the bundle's tokenizer."""
    from loradeploy.base import load_tokenizer

    _, greedy = _ort_cpu(lm_bundle["folder"])
    tokenizer = load_tokenizer(lm_bundle["folder"])
    prompt = web.tokenize(TEXTS[1])
    outs = {}
    for adapter in (*ADAPTERS, None):
        outs[adapter] = web.greedy(prompt, adapter, n=12)
        assert outs[adapter] == greedy(prompt, adapter, 12), adapter
        gen = web.generate(TEXTS[1], adapter, max_new_tokens=12)
        stop = next((i + 1 for i, t in enumerate(outs[adapter]) if t == 1), 12)  # <eos> is id 1
        assert gen.tokens == outs[adapter][:stop] and gen.prompt_tokens == len(prompt)
        assert gen.text == tokenizer.decode(gen.tokens, skip_special_tokens=True)


def test_js_tokenizer_equals_the_hugging_face_tokenizer(lm_bundle, web):
    from loradeploy.base import load_tokenizer

    tokenizer = load_tokenizer(lm_bundle["base"])
    for text in [*TEXTS, "", "  two  spaces\nand a newline"]:
        assert web.tokenize(text) == tokenizer(text)["input_ids"], text


def test_an_encoder_to_the_lm_target_and_an_lm_to_the_encoder_target_are_one_line(lm_bundle, tmp_path, capsys):
    eval_path = str(lm_bundle["root"] / "eval.txt")
    main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}",
                            "--target", "onnx-web-int4", "--out", str(tmp_path / "a")], "onnx-web-int4")
    main_bad_input(capsys, ["export", "--base", str(lm_bundle["base"]), "--adapter",
                            f"lora={lm_bundle['root'] / 'lora'}", "--target", "onnx-web", "--eval", eval_path,
                            "--out", str(tmp_path / "b")], "onnx-web")
    main_bad_input(capsys, ["export", "--base", str(lm_bundle["base"]), "--adapter",
                            f"lora={lm_bundle['root'] / 'lora'}", "--target", "onnx-web-int4", "--mode", "merged",
                            "--eval", eval_path, "--out", str(tmp_path / "c")], "--mode swappable")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_a_tiny_llama_bundle_passes_and_matches_onnxruntime_cpu(tmp_path):
    """The other family of the decoder path (no sliding window, untied head, plain RMSNorm): the
    bundle validates within the budgets, and wasm's logits are onnxruntime CPU's on its graph."""
    from loradeploy import runtime

    base = tiny_lm.build(tmp_path / "hf", "llama")
    adapter = tiny_lm.peft_adapter(tmp_path / "a", base, seed=2, norms=True)
    (tmp_path / "eval.txt").write_text("\n".join(TEXTS) + "\n")
    record = export_adapters(str(base), [AdapterSpec("a", adapter)], str(quick_profile(tmp_path, "onnx-web-int4")),
                             tmp_path / "bundle", eval_path=tmp_path / "eval.txt")
    assert record["validation"]["passed"] and record["decisions"]["architecture"] == "LlamaForCausalLM"
    forward, _ = _ort_cpu(tmp_path / "bundle")
    with runtime.open(tmp_path / "bundle", threads=1) as session:
        tokens = session.tokenize(TEXTS[2])
        for name in ("a", None):
            assert np.abs(session.logits(tokens, name) - forward(tokens, name)[0]).max() < TIGHT, name
