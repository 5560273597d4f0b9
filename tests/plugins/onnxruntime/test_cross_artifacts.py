"""Every adapter of a base loads into every swappable onnx-cpu artifact of that base (issue 36):
three two-label MiniLM adapters of different kinds, each exported alone, each loaded into each
other's artifact, answering like its own fp32 PyTorch reference."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters as export
from tests.support.profiles import quick_profile

pytestmark = pytest.mark.slow
AGREE_ATOL = 1e-4  # max |Δlogit| between the ONNX Runtime artifact and the fp32 PyTorch reference
#: LayerNorms the SoRA adapter trained (OpenDelta saves what it unfroze): the embeddings' and two blocks'
TRAINED_NORMS = ["bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm",
                 "bert.encoder.layer.4.output.LayerNorm"]
N_TEXTS = 12


def sora_with_layernorms(folder, base_model):
    """A SoRA checkpoint (OpenDelta layout) that also carries trained LayerNorm weights and biases."""
    from tests.support.synthetic import make_sora

    make_sora(folder, seed=5)
    state = torch.load(folder / "pytorch_model.bin")
    params = dict(base_model.named_parameters())
    g = torch.Generator().manual_seed(6)
    for norm in TRAINED_NORMS:
        for kind in ("weight", "bias"):
            p = params[f"{norm}.{kind}"].detach()
            state[f"{norm}.{kind}"] = p * 1.3 + 0.1 * torch.randn(p.shape, generator=g)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def peft_with_trailing_zero_ranks(folder):
    """A PEFT LoRA (r 8) whose last ranks are all zero in some modules, with a trained head."""
    from safetensors.torch import save_file

    from tests.support.synthetic import MODULES, _head

    g = torch.Generator().manual_seed(7)
    tensors = {}
    for k, (name, (out_f, in_f)) in enumerate(MODULES.items()):
        a, b = torch.randn(8, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, 8, generator=g) * 0.05
        live = 8 - 2 * (k % 4)  # 8, 6, 4, 2 live ranks: the rest trailing zeros
        a[live:], b[:, live:] = 0.0, 0.0
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    tensors.update({f"base_model.model.{k}": v for k, v in _head(g).items()})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["query", "value", "dense"], "modules_to_save": ["classifier"], "bias": "none",
        "fan_in_fan_out": False}))
    return folder


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """The three adapters, each exported alone (default slots), and the texts they are run on."""
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.evaldata import DEFAULT_EVAL
    from loradeploy.ir import Task
    from tests.support.synthetic import make_blora

    folder = tmp_path_factory.mktemp("cross")
    base = load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2)
    eval_path = folder / "eval.jsonl"
    eval_path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:N_TEXTS]) + "\n")
    sources = {"sora-ln": sora_with_layernorms(folder / "sora-ln", base),
               "blora": make_blora(folder / "blora").path,
               "peft": peft_with_trailing_zero_ranks(folder / "peft")}
    profile = quick_profile(folder, "onnx-cpu")
    records = {n: export("minilm", [AdapterSpec(n, src)], profile, folder / f"art-{n}", mode="swappable",
                         eval_path=eval_path) for n, src in sources.items()}
    return {"folder": folder, "base": base, "sources": sources, "records": records, "eval": eval_path}


def test_every_adapter_answers_like_its_reference_in_every_artifact(cross):
    """6 of 6 cross pairs (and each adapter in its own artifact) within 1e-4 of the adapter's
    own fp32 PyTorch reference; the norms the SoRA adapter trained take effect everywhere."""
    import dataclasses

    from loradeploy import runtime
    from loradeploy.adapters import read_adapter
    from loradeploy.base import load_tokenizer, resolve_base
    from loradeploy.base_slots import norm_parameters
    from loradeploy.evaldata import load_eval
    from loradeploy.ir import Task
    from loradeploy.reference import reference_outputs
    from loradeploy.validate import session_outputs

    base, names = cross["base"], list(cross["sources"])
    norms = norm_parameters(base, "norms")
    assert len(norms) == 2 * (6 * 2 + 1)  # weight and bias: two LayerNorms per block, the embeddings'
    for n, rec in cross["records"].items():
        assert rec["validation"]["passed"], n
        assert rec["decisions"]["lora_slots_spec"] == "blocks,norms" and rec["decisions"]["norm_inputs"] == len(norms)
        assert set(norms) | {"classifier.weight", "classifier.bias"} <= set(rec["decisions"]["graph_inputs_overridable"])
    tok = load_tokenizer(resolve_base("minilm"))
    texts = load_eval(cross["eval"]).texts
    adapters = {n: read_adapter(src) for n, src in cross["sources"].items()}
    assert {k for k in adapters["sora-ln"].extra_tensors if "LayerNorm" in k} == \
        {f"{n}.{k}" for n in TRAINED_NORMS for k in ("weight", "bias")}
    refs = {n: reference_outputs(base, a, Task.SEQUENCE_CLASSIFICATION, tok, texts) for n, a in adapters.items()}
    # the trained norms matter: without them the SoRA adapter answers differently
    no_norms = dataclasses.replace(adapters["sora-ln"], extra_tensors={
        k: v for k, v in adapters["sora-ln"].extra_tensors.items() if "LayerNorm" not in k})
    assert np.abs(reference_outputs(base, no_norms, Task.SEQUENCE_CLASSIFICATION, tok, texts)
                  - refs["sora-ln"]).max() > 100 * AGREE_ATOL
    worst, pairs = {}, 0
    for host in names:
        with runtime.open(cross["folder"] / f"art-{host}") as session:
            for guest in names:
                name = guest if guest == host else f"{guest}-guest"
                if guest != host:
                    session.load_adapter(name, cross["folder"] / f"art-{guest}" / "adapters" / f"{guest}.onnx_adapter")
                    pairs += 1
                got = session_outputs(session, name, tok, texts)
                worst[host, guest] = float(np.abs(got - refs[guest]).max())
                for other in names:
                    if other != guest:  # really the guest's answers, not the host's or the third's
                        assert np.abs(got - refs[other]).max() > 100 * AGREE_ATOL, (host, guest, other)
    assert pairs == 6
    assert max(worst.values()) <= AGREE_ATOL, worst


def _with_adapter_file(src, dst, name, tensors):
    """A copy of artifact ``src`` whose manifest also lists adapter ``name``, a file holding
    ``tensors`` (right provenance, so only the tensor check can refuse it)."""
    from loradeploy.fsutil import sha256_file
    from loradeploy.plugins.onnxruntime.adapter_tensors import write_adapter_file

    shutil.copytree(src, dst)
    path = dst / "adapters" / f"{name}.onnx_adapter"
    write_adapter_file(tensors, path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["adapters"].append({"name": name, "method": "peft", "sources": [], "file": f"adapters/{name}.onnx_adapter"})
    manifest["files"].append({"path": f"adapters/{name}.onnx_adapter", "sha256": sha256_file(path),
                              "bytes": path.stat().st_size})
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("tensor, shape, message", [
    ("bert.encoder.layer.2.output.LayerNorm.weight", (100,),
     r"bert\.encoder\.layer\.2\.output\.LayerNorm\.weight is tensor\(float\) \[100\], the graph takes tensor\(float\) \[384\]$"),
    ("classifier.weight", (3, 384),
     r"classifier\.weight is tensor\(float\) \[3, 384\], the graph takes tensor\(float\) \[2, 384\]$"),
    ("bert.encoder.layer.9.output.LayerNorm.bias", (384,),
     r"bert\.encoder\.layer\.9\.output\.LayerNorm\.bias is not an input of this graph$"),
])
def test_an_adapter_that_does_not_fit_is_one_line_naming_the_tensor_and_shapes(cross, tmp_path, tensor, shape, message):
    """A tensor of a shape the base does not have, or of a module the base does not have (MiniLM
    has 6 layers): one line naming the tensor and both shapes, nothing loaded."""
    from loradeploy import runtime
    from loradeploy.errors import BaseModelError

    path = _with_adapter_file(cross["folder"] / "art-peft", tmp_path / "art", "odd",
                              {tensor: np.ones(shape, np.float32)})
    with runtime.open(cross["folder"] / "art-peft") as session:
        with pytest.raises(BaseModelError) as err:
            session.load_adapter("odd", path)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: does not fit this session's graph inputs: ")
        assert re.search(message, str(err.value)), str(err.value)
        assert session.adapters == ("peft",)


def test_slots_blocks_keeps_norms_constant_and_refuses_a_norm_carrying_adapter(cross, tmp_path):
    """``--slots blocks``: the cheaper choice, no norm inputs; the SoRA adapter with trained
    LayerNorms is then refused, naming a norm the graph lacks."""
    from loradeploy import runtime
    from loradeploy.errors import BaseModelError

    rec = export("minilm", [AdapterSpec("peft", cross["sources"]["peft"])], quick_profile(tmp_path, "onnx-cpu"),
                 tmp_path / "blocks", mode="swappable", eval_path=cross["eval"], slots="blocks")
    assert rec["decisions"]["norm_inputs"] == 0
    assert not [n for n in rec["decisions"]["graph_inputs_overridable"] if "LayerNorm" in n]
    with runtime.open(tmp_path / "blocks") as session:
        with pytest.raises(BaseModelError, match=r"bert\.embeddings\.LayerNorm\.bias is not an input of this graph \(and 5 more\)"):
            session.load_adapter("sora-ln", cross["folder"] / "art-sora-ln" / "adapters" / "sora-ln.onnx_adapter")
