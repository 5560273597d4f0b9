"""The bad-input corpus beyond adapter files: corrupt and edited artifacts, bad baselines, plans,
profiles, eval sets and options, across verify, validate, check, export, quantize, targets and
ab. Each case is built from one real exported artifact (MiniLM + the shipped SoRA adapter) by a
named mutation; each must give its exit code (1: verify names a failing file, and check and
validate fail a changed file the same way before measuring; 2: one `error:` line), no traceback,
and nothing (half-)written."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from loradeploy.cli import main
from loradeploy import manifest as mf
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile
from tests.support.tamper import assert_every_verb_fails, copy_with_flipped_byte

pytestmark = pytest.mark.slow
ADAPTER = EXAMPLE_ADAPTERS / "sora"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One exported swappable onnx-cpu artifact with a short eval set and timing."""
    from loradeploy.evaldata import DEFAULT_EVAL

    root = tmp_path_factory.mktemp("good")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    profile = quick_profile(root, "onnx-cpu")
    art = root / "art"
    assert main(["export", "--base", "minilm", "--adapter", f"sora={ADAPTER}", "--target", str(profile),
                 "--eval", str(eval_file), "-o", str(art), "--json"]) == 0
    return {"art": art, "eval": eval_file, "profile": profile}


def _copy(good, tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(good["art"], art)
    return art


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _save_manifest(art: Path, m: dict) -> None:
    """Write an edited manifest with its own sha256 set again (a consistent forgery: the cases
    below test what lies beyond that check)."""
    (art / "manifest.json").write_text(json.dumps(mf.sealed(m)))


def _relist(art: Path, rel: str) -> None:
    """Edit the manifest so its sha256/size match the file as it is now (a consistent forgery)."""
    from loradeploy.fsutil import sha256_file

    m = _manifest(art)
    for f in m["files"]:
        if f["path"] == rel:
            f["sha256"], f["bytes"] = sha256_file(art / rel), (art / rel).stat().st_size
    _save_manifest(art, m)


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- verify: the artifact is not what its manifest says (exit 1, the file named) ------------

def m_flip_adapter(art):
    _flip_byte(art / "adapters" / "sora.onnx_adapter", 200)
    return "adapters/sora.onnx_adapter", "sha256 differs"


def m_truncate_onnx(art):
    p = art / "model.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "model.onnx", "bytes, the manifest says"


def m_extra_file(art):
    (art / "adapters" / "evil.onnx_adapter").write_bytes(b"x")
    return "adapters/evil.onnx_adapter", "not listed"


def m_missing_file(art):
    (art / "tokenizer.json").unlink()
    return "tokenizer.json", "missing"


def m_flip_vocab(art):
    _flip_byte(art / "vocab.txt", 10)
    return "vocab.txt", "sha256 differs"


def m_forged_onnx(art):
    p = art / "model.onnx"
    p.write_bytes(b"\x00" * p.stat().st_size)
    _relist(art, "model.onnx")
    return "model.onnx", "not a valid onnx file"


def m_forged_adapter(art):
    p = art / "adapters" / "sora.onnx_adapter"
    p.write_bytes(b"not flatbuffers" * 10)
    _relist(art, "adapters/sora.onnx_adapter")
    return "adapters/sora.onnx_adapter", "not a valid onnx_adapter file"


def m_forged_json(art):
    (art / "tokenizer_config.json").write_text("{not json")
    _relist(art, "tokenizer_config.json")
    return "tokenizer_config.json", "not a valid json file"


def m_truncated_gguf(art):
    """A truncated adapter GGUF listed (with its true sha256) in the manifest."""
    import gguf
    import numpy as np

    path = art / "adapters" / "extra.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes()[:-300])
    m = _manifest(art)
    m["files"].append({"path": "adapters/extra.gguf", "sha256": "", "bytes": 0})
    _save_manifest(art, m)
    _relist(art, "adapters/extra.gguf")
    return "adapters/extra.gguf", "not a valid gguf file"


def m_edited_measurement(art):
    """A measurement edited in the manifest (its own sha256 not set again)."""
    m = _manifest(art)
    m["validation"]["metrics"]["sora"]["label_agreement"] = 0.5
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    return "manifest.json", "the manifest was edited"


def m_bad_gguf_magic(art):
    path = art / "adapters" / "other.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 64)
    m = _manifest(art)
    m["files"].append({"path": "adapters/other.gguf", "sha256": "", "bytes": 0})
    _save_manifest(art, m)
    _relist(art, "adapters/other.gguf")
    return "adapters/other.gguf", "bad magic"


VERIFY_FAIL = [m_flip_adapter, m_truncate_onnx, m_extra_file, m_missing_file, m_flip_vocab, m_forged_onnx,
               m_forged_adapter, m_forged_json, m_truncated_gguf, m_bad_gguf_magic, m_edited_measurement]


@pytest.mark.parametrize("mutate", VERIFY_FAIL, ids=[f.__name__ for f in VERIFY_FAIL])
def test_verify_names_the_failing_file(good, tmp_path, capsys, mutate):
    art = _copy(good, tmp_path)
    rel, problem = mutate(art)
    code = main(["verify", str(art), "--json"])
    out = capsys.readouterr()
    record = json.loads(out.out)
    assert code == 1 and not record["ok"] and "Traceback" not in out.err
    assert any(p["file"] == rel and problem in p["problem"] for p in record["problems"]), record["problems"]
    main(["verify", str(art)])
    assert rel in capsys.readouterr().out  # the human form names it too


@pytest.mark.parametrize("rel", ["model.onnx", "adapters/sora.onnx_adapter", "vocab.txt", "tokenizer.json"])
def test_a_flipped_byte_fails_verify_check_and_validate(good, tmp_path, capsys, rel):
    """One byte flipped at a third of the file: exit 1 naming it in all three verbs (check and
    validate used to pass a changed graph with 0, and a changed adapter file was exit 2)."""
    art = copy_with_flipped_byte(good["art"], rel, tmp_path)
    assert_every_verb_fails(art, rel, good["art"], capsys)


def test_an_edited_measurement_fails_verify_check_and_validate(good, tmp_path, capsys):
    art = _copy(good, tmp_path)
    rel, problem = m_edited_measurement(art)
    assert_every_verb_fails(art, rel, good["art"], capsys, problem)


def test_a_manifest_from_before_its_own_sha256_verifies_with_a_note(good, tmp_path, capsys):
    """Older manifests record no sha256 of themselves: read, verified, and the note says their
    contents are unprotected; with the field the note is gone."""
    art = _copy(good, tmp_path)
    assert main(["verify", str(art), "--no-load", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
    m = _manifest(art)
    del m["manifest_sha256"]
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    assert main(["verify", str(art), "--no-load", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and "records no manifest_sha256" in notes[0] and "not checked" in notes[0]
    assert main(["verify", str(art), "--no-load"]) == 0
    assert "note: manifest.json records no manifest_sha256" in " ".join(capsys.readouterr().out.split())
    m["validation"]["metrics"]["sora"]["label_agreement"] = 0.5  # unprotected: still exit 0
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    assert main(["verify", str(art), "--no-load"]) == 0


# --- one `error:` line and exit 2 ---------------------------------------------------------------

def e_no_manifest(art, good, tmp):
    (art / "manifest.json").unlink()
    return ["verify", str(art)], "no manifest.json"


def e_manifest_not_json(art, good, tmp):
    (art / "manifest.json").write_text("{")
    return ["verify", str(art)], "not valid JSON"


def e_manifest_wrong_version(art, good, tmp):
    m = _manifest(art)
    m["manifest_version"] = 99
    _save_manifest(art, m)
    return ["verify", str(art)], "not a loradeploy manifest"


def e_manifest_files_malformed(art, good, tmp):
    m = _manifest(art)
    m["files"] = "everything"
    _save_manifest(art, m)
    return ["verify", str(art)], "file list is missing or malformed"


def e_verify_missing_folder(art, good, tmp):
    return ["verify", str(tmp / "nope")], "no such artifact folder"


def e_validate_no_manifest(art, good, tmp):
    (art / "manifest.json").unlink()
    return ["validate", str(art)], "not a loradeploy artifact"


def e_validate_source_changed(art, good, tmp):
    m = _manifest(art)
    m["adapters"][0]["sources"][0]["sha256"] = "0" * 64
    _save_manifest(art, m)
    return ["validate", str(art)], "missing or changed"


def e_validate_profile_edited(art, good, tmp):
    m = _manifest(art)
    m["target"]["profile"]["runtime"] = "tensorrt"
    _save_manifest(art, m)
    return ["validate", str(art)], "runtime 'tensorrt' is not one of"


def e_check_missing_baseline(art, good, tmp):
    return ["check", str(art), "--baseline", str(tmp / "none.json")], "no such baseline"


def e_check_baseline_not_json(art, good, tmp):
    (tmp / "b.json").write_text("[")
    return ["check", str(art), "--baseline", str(tmp / "b.json")], "not valid JSON"


def e_check_baseline_no_validation(art, good, tmp):
    m = _manifest(art)
    del m["validation"]
    (tmp / "b.json").write_text(json.dumps(m))
    return ["check", str(art), "--baseline", str(tmp / "b.json")], "holds no validation"


def e_check_bad_tolerance(art, good, tmp):
    return ["check", str(art), "--baseline", str(art), "--tolerance", "speed=2"], "expected fidelity="


def e_check_negative_tolerance(art, good, tmp):
    return ["check", str(art), "--baseline", str(art), "--tolerance", "size=-1"], "non-negative"


def e_check_other_task(art, good, tmp):
    m = _manifest(art)
    m["task"] = "causal-lm"
    (tmp / "b.json").write_text(json.dumps(m))
    return ["check", str(art), "--baseline", str(tmp / "b.json"), "--junit", str(tmp / "out.xml")], "nothing to compare"


def e_check_not_artifact(art, good, tmp):
    (art / "manifest.json").unlink()
    return ["check", str(art), "--baseline", str(good["art"])], "not a loradeploy artifact"


def e_export_other_base(art, good, tmp):
    return ["export", "--base", "minilm", "--adapter", str(EXAMPLE_ADAPTERS / "sora-gemma"), "--target",
            str(good["profile"]), "-o", str(tmp / "out")], "does not fit base minilm (a bert model): module"


def e_export_bad_eval(art, good, tmp):
    (tmp / "eval.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": 3}\n')
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--eval", str(tmp / "eval.jsonl"), "-o", str(tmp / "out")], "eval.jsonl:2"


def e_export_plan_garbage(art, good, tmp):
    (tmp / "plan.json").write_text("plan")
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", str(tmp / "plan.json"), "-o", str(tmp / "out")], "not a JSON plan file"


def e_export_plan_other_runtime(art, good, tmp):
    (tmp / "plan.json").write_text(json.dumps({"plan_version": 1, "runtime": "llama.cpp", "target": "gguf-cpu",
                                               "adapters": {"sora": {"formats": {"x.lora_A": "f16"}}}}))
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", str(tmp / "plan.json"), "-o", str(tmp / "out")], "the plan is for llama.cpp"


def e_export_plan_wrong_tensors(art, good, tmp):
    (tmp / "plan.json").write_text(json.dumps({"plan_version": 1, "runtime": "onnxruntime", "target": "onnx-cpu",
                                               "adapters": {"sora": {"formats": {"x.lora_A": "int8"}}}}))
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", str(tmp / "plan.json"), "-o", str(tmp / "out")], "does not fit adapter"


def e_export_plan_bad_format(art, good, tmp):
    (tmp / "plan.json").write_text(json.dumps({"plan_version": 1, "runtime": "onnxruntime", "target": "onnx-cpu",
                                               "adapters": {"sora": {"formats": {"x.lora_A": "q4_k"}}}}))
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", str(tmp / "plan.json"), "-o", str(tmp / "out")], "is not one onnxruntime stores"


def e_export_uniform_bits(art, good, tmp):
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", "uniform:3", "-o", str(tmp / "out")], "uniform:3"


def e_export_merged_with_plan(art, good, tmp):
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--mode", "merged", "--plan", "uniform:8", "-o", str(tmp / "out")], "swappable mode"


def e_export_budget_measure(art, good, tmp):
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(good["profile"]),
            "--plan", "learned", "--budget", "kl_mean=0.1", "-o", str(tmp / "out")], "held to mean_abs_logit"


def e_export_profile_bad_plan(art, good, tmp):
    data = yaml.safe_load(good["profile"].read_text())
    data["plan"] = "smart"
    (tmp / "p.yaml").write_text(yaml.safe_dump(data))
    return ["export", "--base", "minilm", "--adapter", str(ADAPTER), "--target", str(tmp / "p.yaml"),
            "-o", str(tmp / "out")], "plan must be 'learned'"


def e_quantize_no_folder(art, good, tmp):
    return ["quantize", "--base", "minilm", "--adapter", str(ADAPTER), "--target", "onnx-cpu",
            "-o", str(tmp / "missing" / "plan.json")], "no such folder"


def e_quantize_bad_uniform(art, good, tmp):
    return ["quantize", "--base", "minilm", "--adapter", str(ADAPTER), "--target", "onnx-cpu", "--plan",
            "uniform:abc", "-o", str(tmp / "plan.json")], "expected uniform:BITS"


def e_quantize_bad_budget(art, good, tmp):
    return ["quantize", "--base", "minilm", "--adapter", str(ADAPTER), "--target", "onnx-cpu", "--budget",
            "mean_abs_logit=zero", "-o", str(tmp / "plan.json")], "is not a number"


def e_quantize_bnb_int4(art, good, tmp):
    return ["quantize", "--base", "minilm", "--adapter", str(ADAPTER), "--target", "bnb-nf4", "--plan",
            "uniform:4", "-o", str(tmp / "plan.json")], "bitsandbytes stores LoRA tensors in"


def e_quantize_exists(art, good, tmp):
    (tmp / "plan.json").write_text("{}")
    return ["quantize", "--base", "minilm", "--adapter", str(ADAPTER), "--target", "onnx-cpu",
            "-o", str(tmp / "plan.json")], "exists"


def e_targets_bad_profile(art, good, tmp, monkeypatch=None):
    folder = tmp / "profiles"
    folder.mkdir()
    (folder / "broken.yaml").write_text("name: broken\nruntime: onnxruntime\nprecision: fp8\n")
    return ["targets"], "precision 'fp8' is not one of", {"LORADEPLOY_TARGETS": str(folder)}


def e_ab_missing_adapter(art, good, tmp):
    (tmp / "in.txt").write_text("good\nbad\n")
    return ["ab", str(art), "--arm", f"a={tmp / 'nope.onnx_adapter'}", "--inputs", str(tmp / "in.txt")], "nope.onnx_adapter"


def e_ab_loose_adapter(art, good, tmp):
    (tmp / "in.txt").write_text("good\nbad\n")
    return ["ab", str(art), "--arm", "a=sora", "--arm", f"b={EXAMPLE_ADAPTERS / 'sora-gemma'}",
            "--inputs", str(tmp / "in.txt")], "not inside the adapters/ folder of an exported artifact"


def e_ab_adapter_for_another_graph(art, good, tmp):
    """An adapter exported with int4 LoRA inputs does not fit a graph with fp32 inputs."""
    other = art.parent / "int4"
    assert main(["export", "--base", "minilm", "--adapter", f"sora={ADAPTER}", "--target", str(good["profile"]),
                 "--plan", "uniform:4", "--eval", str(good["eval"]), "-o", str(other), "--json"]) in (0, 1)
    (tmp / "in.txt").write_text("good\nbad\n")
    return ["ab", str(art), "--arm", "a=sora", "--arm", f"b={other / 'adapters' / 'sora.onnx_adapter'}",
            "--inputs", str(tmp / "in.txt")], "does not fit this session's graph inputs"


ERRORS = [e_no_manifest, e_manifest_not_json, e_manifest_wrong_version, e_manifest_files_malformed,
          e_verify_missing_folder, e_validate_no_manifest, e_validate_source_changed, e_validate_profile_edited,
          e_check_missing_baseline, e_check_baseline_not_json, e_check_baseline_no_validation, e_check_bad_tolerance,
          e_check_negative_tolerance, e_check_other_task, e_check_not_artifact, e_export_other_base,
          e_export_bad_eval, e_export_plan_garbage, e_export_plan_other_runtime, e_export_plan_wrong_tensors,
          e_export_plan_bad_format, e_export_uniform_bits, e_export_merged_with_plan, e_export_budget_measure,
          e_export_profile_bad_plan, e_quantize_no_folder, e_quantize_bad_uniform, e_quantize_bad_budget,
          e_quantize_bnb_int4, e_quantize_exists, e_targets_bad_profile, e_ab_missing_adapter, e_ab_loose_adapter,
          e_ab_adapter_for_another_graph]


@pytest.mark.parametrize("case", ERRORS, ids=[f.__name__ for f in ERRORS])
def test_error_is_one_line_exit_2_nothing_written(good, tmp_path, capsys, monkeypatch, case):
    art = _copy(good, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    argv, expect, *env = case(art, good, work)
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    before = sorted(p.name for p in work.iterdir())
    main_bad_input(capsys, argv, expect)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, no partial files
    assert not any(p.name.startswith(".") and "partial" in p.name for p in tmp_path.rglob("*"))


def test_corpus_counts():
    """The corpus: adapter-file cases (tests/bad_inputs) plus these artifact/command cases."""
    adapter_cases = json.loads((Path(__file__).parent / "bad_inputs" / "cases.json").read_text())
    assert len(adapter_cases) + len(VERIFY_FAIL) + len(ERRORS) >= 60
