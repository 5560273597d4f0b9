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
    ({"opset": "17"}, "opset must be a non-negative integer \\(onnxruntime's own option\\)"),
    ({"opset": True}, "opset must be a non-negative integer"),
    ({"double_quant": True}, "unknown key 'double_quant'"),  # bitsandbytes' option, not onnxruntime's
    ({"runtime": "bitsandbytes", "precision": "nf4", "opset": 17}, "unknown key 'opset'.*double_quant"),
    ({"runtime": "bitsandbytes", "precision": "nf4", "double_quant": "yes"}, "double_quant must be true or false"),
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


def test_a_runtimes_own_options_live_in_its_spec_and_keep_their_place_in_the_manifest(tmp_path):
    from loradeploy.manifest import profile_dict
    from loradeploy.profile import parse_profile

    onnx = load_profile(_write(tmp_path, {**BASE, "opset": 21}))
    assert onnx.options == {"execution_provider": "CPUExecutionProvider", "opset": 21}
    bnb = load_profile("bnb-nf4-dq")
    assert bnb.options == {"double_quant": True}
    record = profile_dict(onnx)
    assert list(record)[:7] == ["name", "runtime", "precision", "mode", "description", "execution_provider", "opset"]
    assert "options" not in record and "double_quant" not in record
    from dataclasses import replace

    again = parse_profile(tmp_path / "m.json", {k: v for k, v in record.items() if k != "source"})
    assert again == replace(onnx, source=str(tmp_path / "m.json"))  # the record reads back as the profile


def test_a_manifest_written_before_option_schemas_reads_back(tmp_path):
    """Manifests from before recorded every runtime's options in every profile: read back as a
    record, the other runtimes' options are dropped (a YAML profile that names them is refused)."""
    from loradeploy.manifest import profile_dict
    from loradeploy.profile import parse_profile

    old = {k: v for k, v in profile_dict(load_profile("bnb-nf4")).items() if k != "source"}
    old.update(execution_provider="CPUExecutionProvider", opset=17)
    assert parse_profile(tmp_path / "manifest.json", old, recorded=True) == parse_profile(
        tmp_path / "manifest.json", {k: v for k, v in old.items() if k not in ("execution_provider", "opset")})
    with pytest.raises(ProfileError, match="unknown key 'execution_provider'"):
        parse_profile(tmp_path / "p.yaml", old)
