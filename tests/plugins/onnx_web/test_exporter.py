"""onnx-web target: the bundle's files, its fidelity in onnxruntime-web (Node) against the fp32
PyTorch reference, its manifest, and the Python side's bad inputs."""

import json

import pytest

from loradeploy.plugins.onnx_web import read_file_metadata
from loradeploy.plugins.onnx_web.browser import find_chromium
from tests.plugins.onnx_web.conftest import ADAPTERS
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.tamper import copy_with_flipped_byte

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
WEB_FILES = ("loradeploy.mjs", "lm.mjs", "index.html", "web.json", "base.safetensors", "model.onnx", "tokenizer.json",
             "vendor/tokenizers.mjs", "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.mjs",
             "ort/ort-wasm-simd-threaded.wasm")


def test_bundle_matches_the_pytorch_reference_in_wasm(web_bundle):
    """Every adapter, run by the bundle's loradeploy.mjs in onnxruntime-web under Node, is within
    1e-4 of its fp32 PyTorch reference with every label agreeing, and keeps its effect."""
    _, record = web_bundle
    validation = record["validation"]
    assert validation["passed"], validation["checks"]
    for name in ADAPTERS:
        m = validation["metrics"][name]
        assert m["max_abs_logit"] <= 1e-4 and m["label_agreement"] == 1.0
        assert m["adapter_effect_kept"] >= 0.999
    assert "b1xs32" in validation["latency"]["shapes"]
    assert validation["metrics"]["tokenizer"] == {"agreement": 1.0, "texts": 48, "library": "@huggingface/tokenizers"}
    row = next(c for c in validation["checks"] if c["measure"] == "tokenizer_agreement")
    assert row["status"] == "PASS" and row["budget"] == 1.0
    assert validation["latency"]["node_peak_rss_mb"] > 50  # the Node worker holds the base graph
    # the latency fingerprint names the onnxruntime-web that ran (an npm package), as the manifest does
    fingerprint = validation["latency"]["fingerprint"]
    assert fingerprint["runtime"] == "onnx-web"
    assert fingerprint["runtime_version"] == record["decisions"]["web_packages"]["onnxruntime-web"] == "1.30.0"


def test_bundle_files_are_in_the_manifest_with_their_sha256(web_bundle):
    from loradeploy.fsutil import sha256_file

    folder, record = web_bundle
    files = {f["path"]: f["sha256"] for f in record["files"]}
    for rel in WEB_FILES + tuple(f"adapters/{n}.safetensors" for n in ADAPTERS):
        assert files.get(rel) == sha256_file(folder / rel), rel


def test_slots_are_plain_graph_inputs_and_adapters_are_keyed_by_them(web_bundle):
    import onnx
    from safetensors import safe_open

    folder, _ = web_bundle
    config = json.loads((folder / "web.json").read_text())
    graph = onnx.load(str(folder / "model.onnx")).graph
    inputs = {i.name for i in graph.input}
    wanted = set(config["slots"]) | set(config["travelling"])
    assert wanted <= inputs and not wanted & {i.name for i in graph.initializer}
    assert any(".LayerNorm." in n for n in config["travelling"]) and "classifier.weight" in config["travelling"]
    for name in ADAPTERS:
        with safe_open(str(folder / "adapters" / f"{name}.safetensors"), "np") as f:
            assert read_file_metadata(f.metadata())["base_fingerprint"] == config["base_fingerprint"]
            keys = set(f.keys())
            assert keys and keys <= wanted
            a = next(k for k in sorted(keys) if k.endswith(".lora_A"))
            b = a[:-len("lora_A")] + "lora_B"
            assert f.get_tensor(a).shape[1] == f.get_tensor(b).shape[0] > 0


def test_browser_check_is_recorded(web_bundle):
    _, record = web_bundle
    check = record["validation"]["metrics"]["browser_check"]
    if find_chromium() is None:
        assert check == {"status": "not run (no chromium)"}
        assert not any(c["measure"] == "browser_max_abs_diff" for c in record["validation"]["checks"])
        return
    assert check["status"] == "pass" and check["browser"].startswith(("Chrome/", "HeadlessChrome/"))
    assert check["max_abs_diff"] <= 1e-5 and set(check["per_adapter"]) == {"none", *ADAPTERS}
    row = next(c for c in record["validation"]["checks"] if c["measure"] == "browser_max_abs_diff")
    assert row["status"] == "PASS" and row["budget"] == 1e-5


def test_a_changed_wasm_or_js_file_fails_verify(web_bundle, tmp_path, capsys):
    from loradeploy.cli import main

    folder, _ = web_bundle
    for rel in ("ort/ort-wasm-simd-threaded.wasm", "loradeploy.mjs"):
        art = copy_with_flipped_byte(folder, rel, tmp_path / rel.replace("/", "_"))
        capsys.readouterr()
        assert main(["verify", str(art)]) == 1
        assert rel in capsys.readouterr().out


def test_missing_npm_packages_are_one_error_line(tmp_path, capsys, monkeypatch, web_eval):
    from loradeploy.plugins.onnx_web import node

    monkeypatch.setattr(node, "ORT_DIST", tmp_path / "nowhere")
    main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}",
                            "--target", "onnx-web", "--eval", str(web_eval), "--out", str(tmp_path / "out")],
                   "npm ci --prefix", "web")
    assert not (tmp_path / "out").exists()


def test_merged_mode_is_refused_in_one_line(tmp_path, capsys, web_eval):
    main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}",
                            "--target", "onnx-web", "--mode", "merged", "--eval", str(web_eval),
                            "--out", str(tmp_path / "out")], "--mode swappable")
    assert not (tmp_path / "out").exists()


def test_embeddings_bundle_matches_the_reference(tmp_path, web_eval):
    """A SoRA checkpoint without a head: a sentence-embedding bundle (mean pooling) in wasm."""
    import shutil

    import numpy as np

    from loradeploy import runtime
    from loradeploy.job import AdapterSpec
    from tests.support.exports import export_adapters
    from tests.support.profiles import quick_profile

    src = tmp_path / "sora-nohead"
    src.mkdir()
    for name in ("pytorch_model.bin", "lora_config.json"):
        shutil.copy(EXAMPLE_ADAPTERS / "sora" / name, src / name)
    profile = quick_profile(tmp_path, "onnx-web", runs=1)
    record = export_adapters("minilm", [AdapterSpec("emb", src)], profile, tmp_path / "o", eval_path=web_eval)
    assert record["task"] == "feature-extraction" and record["validation"]["passed"]
    assert record["validation"]["metrics"]["emb"]["cosine_min"] > 0.99999
    if find_chromium() is not None:
        assert record["validation"]["metrics"]["browser_check"]["status"] == "pass"
    with runtime.open(tmp_path / "o", threads=1) as session:
        with_adapter, alone = (session.run_texts(["a short sentence"], a) for a in ("emb", None))
    assert with_adapter.shape == (1, 384) and np.abs(with_adapter - alone).max() > 1e-3


def test_int8_bundle_keeps_labels_and_the_fp32_adapter_files(web_bundle, web_int8_bundle):
    """onnx-web-int8: the base's MatMuls int8 in wasm (MatMulInteger), LoRA paths, norms and head
    fp32 inputs — so each adapter file holds the fp32 bundle's tensors; within the profile's budgets
    in Node (labels, latency at b1 s128) and at most 0.35 of the fp32 bundle's bytes (issue 37)."""
    folder, fp32 = web_bundle
    int8_folder, record = web_int8_bundle
    v = record["validation"]
    assert v["passed"] and all(v["metrics"][n]["label_agreement"] >= 0.99 for n in ADAPTERS)
    latency = next(c for c in v["checks"] if c["measure"] == "latency_p95_ms[b1xs128]")
    assert latency["status"] == "PASS" and latency["budget"] == 1000
    assert "MatMulInteger" in record["decisions"]["quantized_ops"]
    assert record["decisions"]["base_parameters_by_dtype"]["int8"] > 10_000_000
    for n in ADAPTERS:  # the same adapter file, byte for byte (its metadata is one sorted JSON value)
        ours, theirs = ((f / "adapters" / f"{n}.safetensors").read_bytes() for f in (int8_folder, folder))
        assert ours == theirs
    assert v["artifact_bytes"] / fp32["validation"]["artifact_bytes"] <= 0.35  # measured 0.331 (14.2 MB wasm in both)
    if find_chromium() is not None:
        assert v["metrics"]["browser_check"]["status"] == "pass"


def test_int8_bundle_holds_the_word_embedding_in_4bit_blocks(web_int8_bundle):
    """The Gather reading the token ids from the vocabulary's table is onnxruntime's
    GatherBlockQuantized on uint4 blocks (not an fp32 table, nor quantize_dynamic's uint8 one with a
    DequantizeLinear), no other copy of the table is left, and the manifest says what the graph holds."""
    import onnx

    from loradeploy.plugins.onnx_web.quantized_base import EMBEDDING_BLOCK

    folder, record = web_int8_bundle
    graph = onnx.load(str(folder / "model.onnx")).graph
    tables = {i.name: i for i in graph.initializer}
    embedding = next(n for n in graph.node if n.input[1:2] == ["input_ids"] and n.input[0] in tables)
    assert (embedding.domain, embedding.op_type) == ("com.microsoft", "GatherBlockQuantized")
    data = tables[embedding.input[0]]
    vocab, hidden = data.dims
    assert data.data_type == onnx.TensorProto.UINT4 and (vocab, hidden) == (30522, 384)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in embedding.attribute}
    assert attrs["block_size"] == EMBEDDING_BLOCK == 32 and attrs["quantize_axis"] == 1
    assert list(tables[embedding.input[2]].dims) == [vocab, hidden // EMBEDDING_BLOCK]  # one scale a block
    assert [i.name for i in graph.initializer if list(i.dims) == [vocab, hidden]] == [data.name]
    decisions = record["decisions"]
    assert decisions["token_embedding"] == {"node": embedding.name, "op": "GatherBlockQuantized", "dtype": "uint4",
                                            "shape": [vocab, hidden], "block_size": EMBEDDING_BLOCK,
                                            "quantize_axis": 1, "zero_points": True}
    assert "GatherBlockQuantized" in decisions["quantized_ops"]
    assert decisions["base_parameters_by_dtype"]["uint4"] >= vocab * hidden
    assert decisions["base_parameters_by_dtype"]["uint8"] < vocab * hidden  # what quantize_dynamic left uint8
