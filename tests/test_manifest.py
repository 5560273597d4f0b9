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
        "decisions", "files", "validation", "environment", "manifest_sha256"]


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


def test_the_manifest_records_the_sha256_of_its_own_body(tmp_path):
    """An edited measure, file entry or key order: only the first two change the body, so only they
    fail the manifest's own sha256; a manifest written before the field reads and checks as None."""
    m = sample(validation=mf.Validation("eval.jsonl", 48, {"sora": {"label_agreement": 1.0, "kl": float("nan")}},
                                        {"shapes": {}}, 123, [], True),
               decisions={"lora_slot_modules": {"layers.10.q": (8, 8), "layers.9.q": (8, 8)}, "bits": {4: 2, 16: 1},
                          "note": "naïve – ünïcode"})
    path = mf.write(tmp_path, m)
    data = json.loads(path.read_text())
    assert data["manifest_sha256"] == mf.body_sha256(data) and mf.self_check(path) is True
    path.write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))  # another layout, same body
    assert mf.self_check(path) is True
    for edit in (lambda d: d["validation"]["metrics"]["sora"].update(label_agreement=0.5),
                 lambda d: d["files"][0].update(sha256="00" * 32),
                 lambda d: d.update(manifest_sha256="00" * 32)):
        changed = json.loads(json.dumps(data))
        edit(changed)
        path.write_text(json.dumps(changed))
        assert mf.self_check(path) is False
    old = {k: v for k, v in data.items() if k != "manifest_sha256"}
    path.write_text(json.dumps(old))
    assert mf.self_check(path) is None and mf.read(tmp_path).validation.metrics["sora"]["label_agreement"] == 1.0
    assert "manifest_sha256" not in mf.reproducible(data)
    path.write_text('{"manifest_sha256": "00", "tool": "\\ud800"}')  # a lone surrogate: no encoding error
    assert mf.self_check(path) is False
