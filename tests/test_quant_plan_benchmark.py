"""benchmarks/quant_plan.py, scaled down: its LM measure (a plan's artifact against the fp16-adapter
artifact, both in llama.cpp, on the base as shipped and on its dequantized F32 copy) is zero for
the same adapter and grows as the adapter is stored in fewer bits."""

import pytest

from benchmarks import quant_plan as bench
from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters as export
from tests.support.tiny_llama_fixtures import TEXTS, fast_profile, gemma, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_lm_plan_error_is_measured_against_the_fp16_adapter_in_llama_cpp(tmp_path, tiny):  # noqa: F811
    _, path, adapter = tiny
    profile = fast_profile(tmp_path, "gguf-cpu")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    rows = []
    for plan in ("uniform:16", "uniform:4"):
        record = export(str(path), [AdapterSpec("qk", adapter)], profile, tmp_path / plan.replace(":", ""),
                        eval_path=eval_file, plan=plan)
        rows.append({"artifact": str(tmp_path / plan.replace(":", "")), "bytes": record["adapters"][0]["plan"]["bytes"]})
    assert rows[1]["bytes"] < rows[0]["bytes"]
    rows.insert(1, dict(rows[0]))
    # the tiny base is F32 already: its dequantized copy holds the same weights, and both measures agree
    f32_base = bench.dequantized_base(path, tmp_path / "base-f32.gguf")
    bench.lm_errors_vs_fp16(rows, "qk", rows[0]["artifact"], TEXTS, f32_base=f32_base)
    for key in ("kl_vs_fp16_adapter", "kl_vs_fp16_adapter_f32_base"):
        assert rows[0][key] == rows[1][key] == 0.0  # the same file, the same logits
        assert rows[2][key] > 1e-7  # 4-bit lora_a moves them
    assert rows[2]["kl_vs_fp16_adapter_f32_base"] == pytest.approx(rows[2]["kl_vs_fp16_adapter"], rel=1e-3)


def test_dequantized_base_holds_the_dequantized_weights(tmp_path, tiny):  # noqa: F811
    """A base with Q8_0 tensors: its F32 copy holds what the gguf package dequantizes them to,
    with every metadata field kept."""
    import gguf
    import numpy as np

    from loradeploy.plugins.llama_cpp.exporter import copy_fields

    _, path, _ = tiny
    src = gguf.GGUFReader(path)
    quantized = tmp_path / "base-q8.gguf"
    w = gguf.GGUFWriter(quantized, arch=src.fields["general.architecture"].contents())
    # every field of the tiny base, its vocabulary arrays cut to 1,000 entries: GGUFReader parses
    # each of Gemma's 262,144 tokens one by one (~20 s per file read here), and no runtime loads this file
    copy_fields(src, w, array_limit=1000)
    for t in src.tensors:
        data = np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            w.add_tensor(t.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    q8_reader = gguf.GGUFReader(quantized)
    q8 = {t.name: t for t in q8_reader.tensors}
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in q8.values())
    fields = {k: f.contents() for k, f in q8_reader.fields.items() if not k.startswith("GGUF.")}
    assert len(fields["tokenizer.ggml.tokens"]) == 1000 and "llama.block_count" in fields
    out = gguf.GGUFReader(bench.dequantized_base(quantized, tmp_path / "base-f32.gguf"))
    assert {k: f.contents() for k, f in out.fields.items() if not k.startswith("GGUF.")} == fields
    for t in out.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        want = gguf.quants.dequantize(q8[t.name].data, q8[t.name].tensor_type)
        assert np.array_equal(np.array(t.data).reshape(want.shape), want)
