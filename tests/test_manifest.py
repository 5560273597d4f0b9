"""The typed manifest on its own: written and read back equal, its JSON key order fixed, the
reproducible part without run-to-run fields, malformed files refused with one error naming them."""

import json

import pytest

from loradeploy import manifest as mf
from loradeploy.errors import ManifestError


def sample(**changes) -> mf.Manifest:
    m = mf.Manifest(
        target=mf.TargetRecord("onnx-cpu", "onnxruntime", {"name": "onnx-cpu", "budgets": {"max_abs_logit_max": 0.001}}),
        mode="swappable", task="sequence-classification", num_labels=2,
        base=mf.BaseRecord("minilm", "/models/minilm", [{"file": "model.safetensors", "sha256": "ab" * 32}]),
        read_options={"format": None}, adapters=[
            mf.AdapterRecord("sora", "sora", [{"path": "a.bin", "sha256": "cd" * 32, "bytes": 10}],
                             "adapters/sora.onnx_adapter", ranks={"q": [8, 4]}, rank_total=[8, 4]),
            mf.AdapterRecord("other", "peft", [], None)],
        decisions={"fused_offline": False}, files=[mf.FileRecord("model.onnx", "ef" * 32, 123)])
    for k, v in changes.items():
        setattr(m, k, v)
    return m


def test_round_trip_through_the_file(tmp_path):
    m = sample(validation=mf.Validation("eval.jsonl", 48, {"sora": {"label_agreement": 1.0}}, {"shapes": {}},
                                        123, [], True), environment={"python": "3.11"})
    mf.write(tmp_path, m)
    back = mf.read(tmp_path)
    assert back.artifact == str(tmp_path.absolute())
    back.artifact = None
    assert back == m
    assert list(json.loads((tmp_path / "manifest.json").read_text())) == [
        "manifest_version", "tool", "target", "mode", "task", "num_labels", "base", "read_options", "adapters",
        "decisions", "files", "validation", "environment"]


def test_properties_and_reproducible_part():
    m = sample(validation=mf.Validation("e", 1, {}, {}, 0, [], True), artifact="/out")
    assert [a.name for a in m.swappable_adapters] == ["sora"] and m.adapter("other").file is None
    assert m.runtime == "onnxruntime" and m.base.shas == ["ab" * 32]
    rep = mf.reproducible(m)
    assert "validation" not in rep and "artifact" not in rep and rep["files"][0]["path"] == "model.onnx"
    assert "plan" not in rep["adapters"][0]  # absent, not null, when no plan was applied


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(manifest_version=2), "not a loradeploy manifest"),
    (lambda d: d.pop("files"), "file list is missing or malformed"),
    (lambda d: d["files"].append({"path": "x"}), "file list is missing or malformed"),
    (lambda d: d.update(target="onnx-cpu"), "'target' is missing or not dict"),
    (lambda d: d["adapters"].append({"name": 3}), "adapter list is malformed"),
    (lambda d: d.update(validation={"passed": True}), "validation record is malformed"),
])
def test_malformed_manifests_are_refused(tmp_path, edit, message):
    data = sample().to_dict()
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as err:
        mf.read(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "manifest.json").write_text("{" * 100000)
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.read(tmp_path)
    with pytest.raises(ManifestError, match="no manifest.json"):
        mf.read(tmp_path / "nowhere")
