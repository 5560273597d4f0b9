"""The decoder LM graph's RMSNorm weights as overridable inputs (``lm_norm_inputs``): tiny Llama and
Gemma 3 (whose graph stores w+1) with a PEFT adapter that trained every norm, exported alone and
beside a LoRA-only adapter's artifact, both loaded into both, against their PyTorch references;
onnxruntime-genai; ``--slots blocks``; the int4 graph; tensors with no input; graphs whose norms
do not match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loradeploy import runtime
from loradeploy.job import AdapterSpec
from tests.support import tiny_lm
from tests.support.cli import main_bad_input
from tests.support.exports import export_adapters
from tests.support.profiles import quick_profile

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test of the decoder"]
NORMS_PER_LAYER = {"llama": 2, "gemma3": 6}  # gemma3: 4 layernorms + q_norm, k_norm
TOL = 1e-4


def _eval(folder: Path) -> Path:
    path = folder / "eval.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _reference(base: Path, adapter: Path | None) -> torch.nn.Module:
    """base + adapter merged by PEFT itself (LoRA merged, ``modules_to_save`` norms loaded)."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


_CACHE: dict[str, dict] = {}


def _setup(family: str, tmp_path_factory) -> dict:
    """A tiny ``family`` base; adapters "norms" (LoRA + every RMSNorm trained), "lora" (the same
    LoRA, no norms: same seed) and "plain" (another LoRA-only adapter); "norms" and "plain" each
    exported alone, swappable with the default slots. Once per test session."""
    if family not in _CACHE:
        root = tmp_path_factory.mktemp(f"norms-{family}")
        base = tiny_lm.build(root / "hf", family)
        adapters = {"norms": tiny_lm.peft_adapter(root / "norms", base, seed=3, norms=True),
                    "lora": tiny_lm.peft_adapter(root / "lora", base, seed=3),
                    "plain": tiny_lm.peft_adapter(root / "plain", base, seed=1)}
        profile, ev = str(quick_profile(root, "onnx-cpu")), _eval(root)
        records = {n: export_adapters(str(base), [AdapterSpec(n, adapters[n])], profile, root / f"art-{n}",
                                      mode="swappable", eval_path=ev) for n in ("norms", "plain")}
        _CACHE[family] = {"root": root, "base": base, "adapters": adapters, "records": records}
    return _CACHE[family]


@pytest.fixture(params=["llama", "gemma3"])
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory) | {"family": request.param}


def test_every_rms_norm_is_an_input_defaulting_to_what_the_builder_stored(setup):
    """Every RMSNorm weight of the base is a graph input (an initializer too) under its Hugging Face
    name; its default is the base's weight, + 1 for Gemma (whose RMSNorm computes x·(1+w)); the
    norm-carrying adapter's file holds its trained weights in the same convention."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from safetensors.torch import load_file

    from loradeploy.base_slots import norm_parameters

    family, base = setup["family"], setup["base"]
    model = _reference(base, None)
    norms = norm_parameters(model, "norms")
    assert len(norms) == NORMS_PER_LAYER[family] * tiny_lm.LAYERS + 1 and "model.norm.weight" in norms
    offset = 1.0 if family == "gemma3" else 0.0
    params = dict(model.named_parameters())
    trained = {k.removeprefix("base_model.model."): v for k, v in
               load_file(str(setup["adapters"]["norms"] / "adapter_model.safetensors")).items() if "norm" in k}
    assert sorted(trained) == norms
    for name, rec in setup["records"].items():
        art = setup["root"] / f"art-{name}"
        assert rec["validation"]["passed"] and rec["decisions"]["norm_inputs"] == len(norms)
        assert set(norms) <= set(rec["decisions"]["graph_inputs_overridable"])
        graph = onnx.load(str(art / "model.onnx"))
        inputs = {i.name for i in graph.graph.input}
        inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer if i.name in norms}
        assert set(norms) <= inputs and sorted(inits) == norms
        for n in norms:
            assert np.abs(inits[n] - (params[n].detach().numpy() + offset)).max() < 1e-6, n
    stored = ort.AdapterFormat.read_adapter(str(setup["root"] / "art-norms" / "adapters" / "norms.onnx_adapter"))
    values = {n: v.numpy() for n, v in stored.get_parameters().items() if "norm" in n}
    assert sorted(values) == norms
    for n in norms:
        assert np.abs(values[n] - (trained[n].numpy() + offset)).max() < 1e-6, n


def test_every_adapter_answers_like_its_reference_in_both_artifacts(setup):
    """The norm-carrying adapter and the LoRA-only one, each in its own artifact and in the other's
    (2 cross pairs), and the base alone: within 1e-4 of PyTorch (PEFT's merge); the trained norms
    take effect (the same LoRA without them answers far off)."""
    tok = tiny_lm.tokenizer()
    root, base, adapters = setup["root"], setup["base"], setup["adapters"]
    refs = {n: _reference(base, adapters.get(n)) for n in ("norms", "lora", "plain", None)}
    ids = [tok(t)["input_ids"] for t in TEXTS]
    want = {n: [_logits(m, i) for i in ids] for n, m in refs.items()}
    assert min(np.abs(a - b).max() for a, b in zip(want["norms"], want["lora"])) > 100 * TOL
    pairs = 0
    for host, guest in (("norms", "plain"), ("plain", "norms")):
        with runtime.open(root / f"art-{host}") as session:
            session.load_adapter(guest, root / f"art-{guest}" / "adapters" / f"{guest}.onnx_adapter")
            for name in (host, guest, None):
                for i, w in zip(ids, want[name]):
                    assert np.abs(session.logits(i, name) - w).max() < TOL, (setup["family"], host, name)
                pairs += name == guest
    assert pairs == 2


def test_onnxruntime_genai_runs_the_norm_carrying_adapter(tmp_path_factory):
    """onnxruntime-genai itself loads the norm-carrying adapter file (Gemma 3) and generates the
    greedy tokens loradeploy's session does; the norms change them."""
    import onnxruntime_genai as og

    from tests.support.og_greedy import og_greedy

    art = _setup("gemma3", tmp_path_factory)["root"] / "art-norms"
    model = og.Model(str(art))
    adapters = og.Adapters(model)
    adapters.load(str(art / "adapters" / "norms.onnx_adapter"), "norms")
    prompts = [tiny_lm.tokenizer()(t)["input_ids"] for t in [*TEXTS, "a b c d e f g h i j k l m n o p"]]
    with runtime.open(art) as session:
        ours = [{n: session.greedy(ids, n, 12) for n in ("norms", None)} for ids in prompts]
    assert any(o["norms"] != o[None] for o in ours)
    for ids, tokens in zip(prompts, ours):
        for name in tokens:
            assert og_greedy(model, adapters, ids, name, 12) == tokens[name], name


def test_slots_blocks_keeps_the_norms_constant_and_refuses_a_norm_carrying_adapter(tmp_path, tmp_path_factory):
    """``--slots blocks``: no norm input, the LoRA-only adapter answers as its reference, and the
    norm-carrying adapter's file is refused, naming a norm; exported itself with ``blocks`` the
    norms it carries are inputs all the same."""
    from loradeploy.errors import BaseModelError

    setup = _setup("llama", tmp_path_factory)
    root, base, adapters = setup["root"], setup["base"], setup["adapters"]
    profile, ev = str(quick_profile(tmp_path, "onnx-cpu")), _eval(tmp_path)
    rec = export_adapters(str(base), [AdapterSpec("plain", adapters["plain"])], profile, tmp_path / "blocks",
                          mode="swappable", eval_path=ev, slots="blocks")
    assert rec["decisions"]["norm_inputs"] == 0 and rec["decisions"]["lora_slots"] == 7 * tiny_lm.LAYERS
    assert not any("norm" in n for n in rec["decisions"]["graph_inputs_overridable"])
    ids = tiny_lm.tokenizer()(TEXTS[0])["input_ids"]
    with runtime.open(tmp_path / "blocks") as session:
        assert np.abs(session.logits(ids, "plain") - _logits(_reference(base, adapters["plain"]), ids)).max() < TOL
        with pytest.raises(BaseModelError, match=r"model\.layers\.0\.input_layernorm\.weight is not an input"):
            session.load_adapter("norms", root / "art-norms" / "adapters" / "norms.onnx_adapter")
    rec = export_adapters(str(base), [AdapterSpec("norms", adapters["norms"])], profile, tmp_path / "carried",
                          mode="swappable", eval_path=ev, slots="blocks")
    assert rec["decisions"]["norm_inputs"] == 2 * tiny_lm.LAYERS + 1 and rec["validation"]["passed"]


def test_int4_graph_takes_the_norms_too(tmp_path, tmp_path_factory):
    """onnx-cpu-int4 swappable: the norms are fp32 inputs, and the norm-carrying adapter answers as
    its LoRA alone does on a base whose norms are the trained ones (the same int4 projections: the
    norms do not enter their quantization), within 1e-4."""
    from safetensors.torch import load_file

    setup = _setup("llama", tmp_path_factory)
    base, adapters = setup["base"], setup["adapters"]
    trained = _reference(base, None)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(adapters["norms"] / "adapter_model.safetensors")).items():
            if "norm" in k:
                params[k.removeprefix("base_model.model.")].copy_(v)
    trained.save_pretrained(tmp_path / "trained-norms")
    tiny_lm.tokenizer().save_pretrained(tmp_path / "trained-norms")
    profile, ev = str(quick_profile(tmp_path, "onnx-cpu-int4")), _eval(tmp_path)
    rec = export_adapters(str(base), [AdapterSpec(n, adapters[n]) for n in ("norms", "lora")], profile,
                          tmp_path / "art", mode="swappable", eval_path=ev)
    assert rec["decisions"]["norm_inputs"] == 2 * tiny_lm.LAYERS + 1
    assert "MatMulNBits" in rec["decisions"]["quantized_ops"]
    export_adapters(str(tmp_path / "trained-norms"), [AdapterSpec("lora", adapters["lora"])], profile,
                    tmp_path / "art-trained", mode="swappable", eval_path=ev)
    ids = tiny_lm.tokenizer()(TEXTS[0])["input_ids"]
    with runtime.open(tmp_path / "art") as session, runtime.open(tmp_path / "art-trained") as baked:
        got, want = session.logits(ids, "norms"), baked.logits(ids, "lora")
        assert np.abs(got - session.logits(ids, "lora")).max() > 100 * TOL  # the norms take effect
    assert np.abs(got - want).max() < TOL


def test_merged_decoder_folds_the_trained_norms_in(tmp_path, tmp_path_factory):
    """``--mode merged``: the trained norms are written into the base before the build; the graph
    has no inputs of its own and answers as PEFT's merge within 1e-4."""
    setup = _setup("gemma3", tmp_path_factory)
    base, adapter = setup["base"], setup["adapters"]["norms"]
    rec = export_adapters(str(base), [AdapterSpec("norms", adapter)], str(quick_profile(tmp_path, "onnx-cpu")),
                          tmp_path / "art", mode="merged", eval_path=_eval(tmp_path))
    assert rec["validation"]["passed"] and "norm_inputs" not in rec["decisions"]
    ids = tiny_lm.tokenizer()(TEXTS[1])["input_ids"]
    want = _logits(_reference(base, adapter), ids)
    assert np.abs(want - _logits(_reference(base, setup["adapters"]["lora"]), ids)).max() > 100 * TOL
    with runtime.open(tmp_path / "art") as session:
        assert np.abs(session.logits(ids) - want).max() < TOL


def test_a_carried_tensor_without_an_input_is_refused(tmp_path, capsys):
    """An adapter that also trained the embeddings (PEFT ``modules_to_save``): one line naming the
    tensor, exit 2, nothing written — swappable and merged alike."""
    from safetensors.torch import load_file, save_file

    base = tiny_lm.build(tmp_path / "hf", "llama")
    adapter = tiny_lm.peft_adapter(tmp_path / "a", base, norms=True)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.embed_tokens.weight"] = load_file(str(base / "model.safetensors"))[
        "model.embed_tokens.weight"] + 0.01
    save_file(tensors, str(weights))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] += ["model.embed_tokens"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for mode in ("swappable", "merged"):
        out = tmp_path / f"out-{mode}"
        main_bad_input(capsys, ["export", "--base", str(base), "--adapter", str(adapter), "--target", "onnx-cpu",
                                "--mode", mode, "--eval", str(_eval(tmp_path)), "-o", str(out)],
                       "model.embed_tokens.weight", "has no input in the decoder graph")
        assert not out.exists()


def test_a_norm_the_graph_does_not_hold_is_refused(tmp_path):
    """A base whose norm value differs from the graph's, or a graph without the norm's node: one
    error naming the parameter (the value is checked, not only the node's name)."""
    import copy

    import onnx

    from loradeploy.errors import BaseModelError
    from loradeploy.plugins.onnxruntime.lm_exporter import build_decoder
    from loradeploy.plugins.onnxruntime.lm_norm_inputs import add_norm_inputs

    base = tiny_lm.build(tmp_path / "hf", "gemma3")
    build_decoder(base, tmp_path / "build", "fp32", tmp_path / "cache")
    graph = onnx.load(str(tmp_path / "build" / "model.onnx"), load_external_data=False)
    model = _reference(base, None)
    names = ["model.layers.1.self_attn.k_norm.weight", "model.norm.weight"]
    assert sorted(add_norm_inputs(copy.deepcopy(graph), tmp_path / "build", model, names)) == sorted(names)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_norm.weight[3] += 0.5
    with pytest.raises(BaseModelError, match=r"does not hold model\.layers\.1\.self_attn\.k_norm\.weight \+ 1"):
        add_norm_inputs(copy.deepcopy(graph), tmp_path / "build", model, names)
    renamed = copy.deepcopy(graph)
    for node in renamed.graph.node:
        node.name = node.name.replace("final_norm_layernorm", "other")
    with pytest.raises(BaseModelError, match=r"no normalization node of its own for model\.norm\.weight"):
        add_norm_inputs(renamed, tmp_path / "build", _reference(base, None), names)
