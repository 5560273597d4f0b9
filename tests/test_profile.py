import pytest
import yaml

from loradeploy.profile import ProfileError, load_profile, profile_paths

BASE = {"version": 1, "name": "t", "runtime": "onnxruntime", "precision": "fp32"}


def _write(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_builtin_profiles_load():
    names = set(profile_paths())
    assert {"onnx-cpu", "onnx-cpu-int8", "onnx-cpu-int4", "gguf-cpu", "gguf-cpu-q8"} <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name
        if p.runtime == "onnxruntime" and p.precision != "gguf":  # batched encoders: b1 and b8 at seq 128
            assert {s.label for s in p.shapes} >= {"b1xs128", "b8xs128"}
        else:  # llama.cpp and decoders on a GGUF base: one sequence; prompt processing of 128 tokens
            assert any(s.seq == 128 for s in p.shapes)


@pytest.mark.parametrize("change,message", [
    ({"precision": "int3"}, "precision 'int3' is not one of"),
    ({"runtime": "tvm"}, "runtime 'tvm' is not one of"),
    ({"mode": "fused"}, "mode 'fused' is not one of"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"budgets": {"label_agreement_min": "high"}}, "budgets.label_agreement_min must be a number"),
    ({"budgets": {"speed": 1}}, "unknown key 'speed' in budgets"),
    ({"shapes": [{"batch": 0, "seq": 128}]}, "bad shape"),
    ({"shapes": []}, "shapes must be a non-empty list"),
    ({"version": 7}, "profile version 7 is not supported"),
    ({"runs": -1}, "runs must be a non-negative integer"),
])
def test_invalid_profiles_name_the_file_and_problem(tmp_path, change, message):
    path = _write(tmp_path, {**BASE, **change})
    with pytest.raises(ProfileError, match=message) as e:
        load_profile(path)
    assert str(tmp_path) in str(e.value)


def test_missing_required_key(tmp_path):
    data = dict(BASE)
    del data["precision"]
    with pytest.raises(ProfileError, match="missing required key 'precision'"):
        load_profile(_write(tmp_path, data))


def test_unknown_target_lists_known():
    with pytest.raises(ProfileError, match="unknown target 'nope'.*onnx-cpu"):
        load_profile("nope")


def test_user_profile_folder(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**BASE, "name": "mine"}))
    monkeypatch.setenv("LORADEPLOY_TARGETS", str(tmp_path))
    assert load_profile("mine").name == "mine"


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ProfileError, match="cannot read YAML"):
        load_profile(str(path))
