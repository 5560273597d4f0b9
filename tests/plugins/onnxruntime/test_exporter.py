"""ONNX Runtime target on MiniLM with the shipped example adapters."""

import json

import numpy as np
import pytest
import torch

from loradeploy.cli import main
from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters as export
from loradeploy.manifest import read as read_manifest
from loradeploy.fsutil import sha256_file
from tests.support.cli import main_bad_input
from tests.support.outputs import artifact_outputs
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

pytestmark = pytest.mark.slow
AGREE_ATOL = 1e-4  # max |Δlogit| between two fp32 paths (ORT swappable, ORT merged, PyTorch)


def fast_profile(tmp_path, name: str, **changes) -> str:
    """A built-in profile with fewer timing runs, its shapes and latency budget kept."""
    return str(quick_profile(tmp_path, name, warmup=1, runs=3, shapes=None, latency_budget=True, **changes))


@pytest.fixture(scope="module")
def eval_small(tmp_path_factory):
    from loradeploy.evaldata import DEFAULT_EVAL

    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:96]) + "\n")
    return path


def test_two_adapters_on_one_session_match_merged_and_reference(tmp_path, eval_small):
    """Activating adapter X on the swappable artifact gives the merged artifact of X and the
    fp32 reference of X (max |Δlogit| < 1e-4), for two adapters with different ranks and heads."""
    from loradeploy.evaldata import load_eval

    profile = fast_profile(tmp_path, "onnx-cpu")
    names = ["sora", "increlora"]
    specs = [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in names]
    swap = export("minilm", specs, profile, tmp_path / "swap", mode="swappable", eval_path=eval_small)
    assert swap["validation"]["passed"]
    texts = load_eval(eval_small).texts
    outs = {n: artifact_outputs(tmp_path / "swap", n, texts) for n in names}
    for spec in specs:
        merged = export("minilm", [spec], profile, tmp_path / f"merged-{spec.name}", mode="merged", eval_path=eval_small)
        merged_out = artifact_outputs(tmp_path / f"merged-{spec.name}", None, texts)
        assert np.abs(outs[spec.name] - merged_out).max() < AGREE_ATOL
        assert swap["validation"]["metrics"][spec.name]["max_abs_logit"] < AGREE_ATOL
        assert merged["validation"]["metrics"]["merged"]["max_abs_logit"] < AGREE_ATOL
    # the two adapters really differ, so a mix-up would be caught
    assert np.abs(outs["sora"] - outs["increlora"]).max() > 100 * AGREE_ATOL
    # no adapter active: the base (rank-0 defaults) with the default head, different again
    base = artifact_outputs(tmp_path / "swap", None, texts)
    assert np.abs(base - outs["sora"]).max() > 100 * AGREE_ATOL


@pytest.mark.parametrize("name", ["sora", "increlora", "blora"])
@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_examples_export_in_both_modes(tmp_path, eval_small, name, mode, capsys):
    out = tmp_path / "out"
    code = main(["export", "--base", "minilm", "--adapter", str(EXAMPLE_ADAPTERS / name),
                 "--target", fast_profile(tmp_path, "onnx-cpu"), "--mode", mode,
                 "--eval", str(eval_small), "-o", str(out), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["validation"]["passed"]
    manifest = read_manifest(out).to_dict()
    for f in manifest["files"]:
        assert sha256_file(out / f["path"]) == f["sha256"]
    assert (out / "report.html").read_text().count("<svg") >= 2
    assert (out / "adapters" / f"{name}.onnx_adapter").is_file() == (mode == "swappable")
    kept = {m: r[1] for m, r in manifest["adapters"][0]["ranks"].items()}
    assert sum(kept.values()) == manifest["adapters"][0]["rank_total"][1] < manifest["adapters"][0]["rank_total"][0]


def test_int8_merged_label_agreement(tmp_path):
    """On the full shipped eval set, the int8 merged artifact agrees with fp32 on ≥ 99.5%."""
    record = export("minilm", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")],
                    fast_profile(tmp_path, "onnx-cpu-int8"), tmp_path / "int8")
    m = record["validation"]["metrics"]["merged"]
    assert record["validation"]["eval_inputs"] == 500
    assert m["label_agreement"] >= 0.995
    assert "MatMulInteger" in record["decisions"]["quantized_ops"]


def test_int8_swappable_keeps_the_head_an_input(tmp_path, eval_small):
    """quantize_dynamic rewrites a Gemm whose weight has an initializer as a MatMul over a new
    transposed constant and drops the input: the heads of an int8 swappable graph must stay
    overridable inputs, so each adapter runs with its own head (it was refused at load before)."""
    import onnx

    specs = [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ("sora", "increlora")]
    record = export("minilm", specs, fast_profile(tmp_path, "onnx-cpu-int8"), tmp_path / "int8",
                    mode="swappable", eval_path=eval_small)
    model = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    assert {"classifier.weight", "classifier.bias"} <= inputs
    assert "MatMulInteger" in record["decisions"]["quantized_ops"]
    for name in ("sora", "increlora"):
        assert record["validation"]["metrics"][name]["label_agreement"] >= 0.97
    assert record["validation"]["passed"]


def test_int4_swappable_keeps_lora_in_fp32(tmp_path, eval_small):
    record = export("minilm", [AdapterSpec("blora", EXAMPLE_ADAPTERS / "blora")],
                    fast_profile(tmp_path, "onnx-cpu-int4"), tmp_path / "int4", mode="swappable",
                    eval_path=eval_small)
    assert "MatMulNBits" in record["decisions"]["quantized_ops"]
    assert record["validation"]["metrics"]["blora"]["label_agreement"] >= 0.95
    import onnx
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    assert any(n.endswith(".lora_A") for n in inputs)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert all(n in floats for n in inputs if n.endswith((".lora_A", ".lora_B")))


def test_validate_command_reruns(tmp_path, eval_small, capsys):
    out = tmp_path / "a"
    export("minilm", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")], fast_profile(tmp_path, "onnx-cpu"),
           out, mode="merged", eval_path=eval_small)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["validate", str(out), "--eval", str(eval_small), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["validation"]["metrics"]["merged"]["max_abs_logit"] < AGREE_ATOL
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}  # validate writes nothing


def test_budget_failure_exits_1(tmp_path, eval_small, capsys):
    profile = fast_profile(tmp_path, "onnx-cpu", budgets={"max_abs_logit_max": 1e-12})
    code = main(["export", "--base", "minilm", "--adapter", str(EXAMPLE_ADAPTERS / "sora"), "--target", profile,
                 "--mode", "merged", "--eval", str(eval_small), "-o", str(tmp_path / "o")])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    assert (tmp_path / "o" / "manifest.json").is_file()  # a failing artifact is still written, for inspection


def _sora_for(tmp_path, modules: dict[str, tuple[int, int]]):
    from safetensors.torch import save_file

    folder = tmp_path / "bad-adapter"
    folder.mkdir()
    sd = {}
    for name, (o, i) in modules.items():
        sd[f"{name}.lora.lora_A"], sd[f"{name}.lora.lora_B"] = torch.randn(2, i), torch.randn(o, 2)
        sd[f"{name}.lora.gate"] = torch.ones(1, 2)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("modules,message", [
    ({"bert.encoder.layer.9.attention.self.query": (384, 384)}, "is not in the base model"),
    ({"bert.encoder.layer.0.attention.self.query": (512, 512)}, "adapter ΔW is [512, 512] but the base weight is [384, 384]"),
])
def test_adapter_base_mismatch(tmp_path, capsys, modules, message):
    adapter = _sora_for(tmp_path, modules)
    out = tmp_path / "out"
    main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", str(adapter), "--target", "onnx-cpu", "-o",
                            str(out)], message, "bad-adapter")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_unknown_target_and_unwritable_output(tmp_path, capsys):
    adapter = str(EXAMPLE_ADAPTERS / "sora")
    def export(base, target, out, *needles):
        return main_bad_input(capsys, ["export", "--base", base, "--adapter", adapter, "--target", target, "-o",
                                       str(out)], *needles)

    assert "did you mean" not in export("minilm", "tpu", tmp_path / "o", "unknown target 'tpu'")
    export("minilm", "onnx-cpu-itn4", tmp_path / "o", "unknown target 'onnx-cpu-itn4': did you mean 'onnx-cpu-int4'?")
    # a Hugging Face folder for the llama.cpp target: how to make a GGUF
    export("minilm", "gguf-cpu", tmp_path / "o", "convert_hf_to_gguf.py")
    (tmp_path / "file").write_text("")
    export("minilm", "onnx-cpu", tmp_path / "file" / "o", "cannot write here")
    export("/nonexistent", "onnx-cpu", tmp_path / "o", "not a model folder or a built-in base")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_feature_extraction_without_head(tmp_path, eval_small, mode):
    """A SoRA checkpoint without a head exports sentence embeddings (mean pooling)."""
    import shutil

    src = tmp_path / "sora-nohead"
    src.mkdir()
    for name in ("pytorch_model.bin", "lora_config.json"):
        shutil.copy(EXAMPLE_ADAPTERS / "sora" / name, src / name)
    record = export("minilm", [AdapterSpec("emb", src)], fast_profile(tmp_path, "onnx-cpu"), tmp_path / "o",
                    mode=mode, eval_path=eval_small)
    assert record["task"] == "feature-extraction"
    m = record["validation"]["metrics"]["emb" if mode == "swappable" else "merged"]
    assert m["cosine_min"] > 0.99999 and record["validation"]["passed"]
    out = artifact_outputs(tmp_path / "o", "emb" if mode == "swappable" else None, ["a short sentence"])
    assert out.shape == (1, 384)


EXAMPLES = ["sora", "increlora", "blora"]


@pytest.fixture(scope="module")
def example_artifacts(tmp_path_factory, eval_small):
    """Each MiniLM example exported alone to a swappable onnx-cpu artifact (default slots)."""
    folder = tmp_path_factory.mktemp("examples")
    profile = fast_profile(folder, "onnx-cpu")
    return {n: (folder / n, export("minilm", [AdapterSpec(n, EXAMPLE_ADAPTERS / n)], profile, folder / n,
                                   mode="swappable", eval_path=eval_small)) for n in EXAMPLES}


def test_every_example_loads_into_every_examples_artifact(example_artifacts):
    """Slots are the base's, not the adapter's: each example's adapter file loads into each other
    example's artifact (both directions) and gives what it gives in its own artifact."""
    from loradeploy import runtime
    from loradeploy.base_slots import block_linears
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.ir import Task

    blocks = block_linears(load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2))
    assert len(blocks) == 6 * 6  # q, k, v, attention output, intermediate, output of 6 layers
    sessions = {n: runtime.open(art) for n, (art, _) in example_artifacts.items()}
    inputs = sessions["sora"].encode(["great camera, sharp pictures", "the battery died in an hour", "fine"])
    own = {n: sessions[n].run(inputs, adapter=n).outputs for n in EXAMPLES}
    for n, (_, manifest) in example_artifacts.items():
        assert manifest["decisions"]["lora_slot_modules"] == {m: list(s) for m, s in blocks.items()}
    # SoRA pruned whole modules that IncreLoRA and B-LoRA keep: the old per-adapter slots would refuse these
    kept = {n: {m for m, r in manifest["adapters"][0]["ranks"].items() if r[1]} for n, (_, manifest) in example_artifacts.items()}
    assert kept["increlora"] - kept["sora"]
    for host in EXAMPLES:
        for guest in EXAMPLES:
            if guest == host:
                continue
            art = example_artifacts[guest][0]
            sessions[host].load_adapter(f"{guest}-guest", art / "adapters" / f"{guest}.onnx_adapter")
            got = sessions[host].run(inputs, adapter=f"{guest}-guest").outputs
            assert np.abs(got - own[guest]).max() < 1e-5, (host, guest)
            assert np.abs(got - own[host]).max() > 1e-2, (host, guest)  # really the guest's adapter
    for s in sessions.values():
        s.close()


def test_adapter_slots_option_names_what_does_not_fit(tmp_path, eval_small, example_artifacts):
    """--slots adapters: slots only where the exported adapter has modules; another adapter's
    file is then refused with the modules the graph lacks."""
    from loradeploy import runtime
    from loradeploy.errors import BaseModelError

    rec = export("minilm", [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")], fast_profile(tmp_path, "onnx-cpu"),
                 tmp_path / "few", mode="swappable", eval_path=eval_small, slots="adapters")
    slots = rec["decisions"]["lora_slot_modules"]
    sora_kept = {m for m, r in rec["adapters"][0]["ranks"].items() if r[1]}
    assert len(slots) == len(sora_kept) < 36
    with runtime.open(tmp_path / "few") as session:
        with pytest.raises(BaseModelError, match=r"is not an input of this graph \(and \d+ more\)"):
            session.load_adapter("inc", example_artifacts["increlora"][0] / "adapters" / "increlora.onnx_adapter")


def test_layernorm_weights_travel_as_graph_inputs(tmp_path, eval_small):
    """An adapter carrying LayerNorm weights and biases (PEFT modules_to_save) is swappable: the
    norms are overridable inputs defaulting to the base's own, so the adapter agrees with its
    merged artifact, and another adapter in the same artifact keeps the base's norms."""
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.evaldata import load_eval
    from loradeploy.ir import Task
    from tests.support.synthetic import with_layernorms

    norms = ["bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.5.output.LayerNorm"]
    base = load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2)
    lora_bias = "bert.encoder.layer.2.attention.self.query"  # a LoRA slot's own bias travels too
    ln = with_layernorms(EXAMPLE_ADAPTERS / "increlora", tmp_path / "ln", base, norms, biases=(lora_bias,))
    profile = fast_profile(tmp_path, "onnx-cpu")
    specs = [AdapterSpec("ln", ln), AdapterSpec("increlora", EXAMPLE_ADAPTERS / "increlora")]
    swap = export("minilm", specs, profile, tmp_path / "swap", mode="swappable", eval_path=eval_small)
    assert swap["validation"]["passed"]
    assert {f"{n}.{k}" for n in norms for k in ("weight", "bias")} | {f"{lora_bias}.bias"} \
        <= set(swap["decisions"]["graph_inputs_overridable"])
    assert lora_bias in swap["decisions"]["lora_slot_modules"]
    texts = load_eval(eval_small).texts
    outs = {n: artifact_outputs(tmp_path / "swap", n, texts) for n in ("ln", "increlora")}
    for spec in specs:
        export("minilm", [spec], profile, tmp_path / f"merged-{spec.name}", mode="merged", eval_path=eval_small)
        merged = artifact_outputs(tmp_path / f"merged-{spec.name}", None, texts)
        assert np.abs(outs[spec.name] - merged).max() < AGREE_ATOL, spec.name
        assert swap["validation"]["metrics"][spec.name]["max_abs_logit"] < AGREE_ATOL
    assert np.abs(outs["ln"] - outs["increlora"]).max() > 100 * AGREE_ATOL  # the norms take effect
