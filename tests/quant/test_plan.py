"""Plan files (loradeploy.quant.plan): a saved plan loads back equal; a malformed or foreign
file is refused with a LoradeployError naming the file and what is wrong; a plan that does not
fit the adapter is refused. No model is loaded."""

import json
from pathlib import Path

import pytest
import torch

from loradeploy.errors import LoradeployError
from loradeploy.ir import AdapterSet, LoraModule, Method
from loradeploy.quant.plan import Plan

FORMATS = {"layer.0.query.lora_A": "int4", "layer.0.query.lora_B": "fp16",
           "layer.0.value.lora_A": "int8", "layer.0.value.lora_B": "fp32"}


def _plan() -> Plan:
    return Plan("onnxruntime", "onnx-cpu-learned",
                {"sora": {"formats": dict(FORMATS), "measured": {"mean_abs_logit": 0.0042}, "nbytes": 1234}},
                {"mean_abs_logit": 0.01}, "learned")


def _adapter(modules=("layer.0.query", "layer.0.value")) -> AdapterSet:
    return AdapterSet(Method.SORA, {m: LoraModule(m, torch.ones(2, 8), torch.ones(8, 2), 1.0) for m in modules})


def test_saved_plan_loads_back_equal(tmp_path):
    path = tmp_path / "plan.json"
    _plan().save(path)
    loaded = Plan.load(path)
    assert loaded == _plan()
    assert loaded.formats_for("sora", _adapter()) == FORMATS
    data = json.loads(path.read_text())
    assert data["plan_version"] == 1 and data["runtime"] == "onnxruntime"
    assert data["adapters"]["sora"]["formats"] == FORMATS
    _plan().save(tmp_path / "again.json")  # the file is deterministic
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_a_plan_of_one_adapter_serves_any_adapter_name(tmp_path):
    path = tmp_path / "plan.json"
    _plan().save(path)
    assert Plan.load(path).formats_for("other-name", _adapter()) == FORMATS


def _write(tmp_path, data) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _good() -> dict:
    return _plan().to_dict()


def _with(**changes) -> dict:
    return {**_good(), **changes}


BAD = {
    "not JSON": ("{plan_version: 1", "not a JSON plan file"),
    "a JSON list": ("[1, 2]", r"not a loradeploy quantization plan \(plan_version 1\)"),
    "no version": ({k: v for k, v in _good().items() if k != "plan_version"}, "not a loradeploy quantization plan"),
    "a future version": (_with(plan_version=2), "not a loradeploy quantization plan"),
    "an unknown runtime": (_with(runtime="tensorrt"), "unknown runtime 'tensorrt'"),
    "no adapters": (_with(adapters={}), "the plan lists no adapters"),
    "an adapter without formats": (_with(adapters={"sora": {"nbytes": 3}}), "adapter 'sora' has no formats"),
    "a format of another runtime": (
        _with(adapters={"sora": {"formats": {**FORMATS, "layer.0.query.lora_A": "q4_0"}}}),
        r"tensor layer\.0\.query\.lora_A: format 'q4_0' is not one onnxruntime stores"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_plan_is_refused(tmp_path, case):
    data, message = BAD[case]
    path = _write(tmp_path, data)
    with pytest.raises(LoradeployError, match=message) as info:
        Plan.load(path)
    assert str(path) in str(info.value)


def test_missing_plan_file_is_refused(tmp_path):
    with pytest.raises(LoradeployError, match="no such plan file"):
        Plan.load(tmp_path / "nope.json")


def test_plan_that_does_not_fit_the_adapter_is_refused(tmp_path):
    plan = _plan()
    with pytest.raises(LoradeployError, match=r"no format for layer\.0\.key\.lora_A"):
        plan.formats_for("sora", _adapter(("layer.0.query", "layer.0.value", "layer.0.key")))
    with pytest.raises(LoradeployError, match=r"tensor layer\.0\.value\.lora_A is not in the adapter"):
        plan.formats_for("sora", _adapter(("layer.0.query",)))
    two = Plan("onnxruntime", "t", {"a": {"formats": FORMATS}, "b": {"formats": FORMATS}})
    with pytest.raises(LoradeployError, match="no plan for adapter 'c' \\(has: a, b\\)"):
        two.formats_for("c", _adapter())


@pytest.mark.parametrize("runtime", ["onnxruntime", "llama.cpp", "bitsandbytes"])
def test_stored_shape_is_the_shape_of_the_stored_matrix(runtime):
    from loradeploy import registry
    from loradeploy.quant.plan import ROLES, stored_matrix, stored_shape

    storage = registry.get(runtime).storage
    m = LoraModule("m", torch.randn(3, 40), torch.randn(24, 3), 2.0)
    for role in ROLES:
        assert stored_shape(m, role, storage) == stored_matrix(m, role, storage).shape
