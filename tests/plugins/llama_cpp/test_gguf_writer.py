"""Adapter GGUF layout, read back with the gguf package (no model needed)."""

import numpy as np
import pytest
import torch

from loradeploy.ir import AdapterSet, LoraModule, Method
from loradeploy.plugins.llama_cpp import exporter as target

INFO = {"arch": "gemma3", "blocks": 2, "heads": 4, "heads_kv": 1}


def _adapter(rank=3):
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, (o, i) in {"model.layers.0.self_attn.q_proj": (1024, 640),
                         "model.layers.1.self_attn.o_proj": (640, 1024)}.items():
        mods[name] = LoraModule(name, torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 0.5,
                                gate=torch.tensor([1.0, -2.0, 0.5][:rank]))
    return AdapterSet(Method.SORA, mods)


@pytest.mark.parametrize("precision,a_type", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("f32", "F32")])
def test_adapter_gguf_layout(tmp_path, precision, a_type):
    import gguf

    adapters = _adapter()
    path = tmp_path / "a.gguf"
    types = target.write_adapter(path, adapters, INFO, precision)
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0 and fields["general.architecture"] == "gemma3"
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b",
                            "blk.1.attn_output.weight.lora_a", "blk.1.attn_output.weight.lora_b"}
    assert types["blk.0.attn_q.weight.lora_a"] == a_type
    assert types["blk.0.attn_q.weight.lora_b"] == ("F32" if precision == "f32" else "F16")  # rows of r=3
    # values: ΔW from the file (llama.cpp's scale 1 with alpha 0) equals the IR's ΔW
    for name, module in adapters.modules.items():
        g = target.tensor_name(INFO, name)
        a, b = (gguf.quants.dequantize(tensors[f"{g}.weight.{s}"].data, tensors[f"{g}.weight.{s}"].tensor_type)
                for s in ("lora_a", "lora_b"))
        delta = b.reshape(module.out_features, -1) @ a.reshape(-1, module.in_features)
        ref = module.delta_weight().numpy()
        tol = {"F32": 1e-5, "F16": 2e-3, "Q8_0": 2e-2, "Q4_0": 0.3}[a_type]
        assert np.abs(delta - ref).max() <= tol * np.abs(ref).max()


def test_permutation_only_for_llama_q_and_k():
    llama = {"arch": "llama", "blocks": 1, "heads": 4, "heads_kv": 2}
    assert target._permutation_heads(llama, "blk.0.attn_q") == 4
    assert target._permutation_heads(llama, "blk.0.attn_k") == 2
    assert target._permutation_heads(llama, "blk.0.attn_v") is None
    assert target._permutation_heads(INFO, "blk.0.attn_q") is None
    # HF's rotary layout pairs row j with row j + d/2 of each head (d: head size); llama.cpp's
    # interleaves them: each head's rows come out as 0, d/2, 1, d/2 + 1, … (convert_hf_to_gguf)
    w = np.arange(16 * 3).reshape(16, 3)
    q_order = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15]  # 4 heads of 4 rows
    k_order = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]  # 2 heads of 8 rows
    assert np.array_equal(target.permute_rows(w, 4), w[q_order])
    assert np.array_equal(target.permute_rows(w, 2), w[k_order])



def test_output_aware_block_codes_are_the_bytes_written(tmp_path):
    """A plan with output-aware rounding on GGML types (lora_a in Q4_0/Q5_0, a rank-32 lora_b in
    Q8_0): the adapter GGUF holds the chosen codes as they are (not re-quantized by the gguf
    package), so what llama.cpp reads is the plan's simulated adapter exactly."""
    import gguf

    from loradeploy.quant.plan import quantize_adapter

    g = torch.Generator().manual_seed(1)
    shapes = {"model.layers.0.self_attn.q_proj": (1024, 640), "model.layers.1.self_attn.o_proj": (640, 1024)}
    adapters = AdapterSet(Method.PEFT_LORA, {n: LoraModule(n, torch.randn(32, i, generator=g), torch.randn(o, 32, generator=g), 0.5)
                                             for n, (o, i) in shapes.items()})
    factors = torch.randn(300, 6, generator=g, dtype=torch.float64)
    grams = {}
    for name, m in adapters.modules.items():
        x = factors @ torch.randn(6, m.in_features, generator=g, dtype=torch.float64)
        x += 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        grams[name] = (x.T @ x).numpy()
    q, o = shapes
    formats = {f"{q}.lora_A": "q4_0", f"{q}.lora_B": "q8_0", f"{o}.lora_A": "q5_0", f"{o}.lora_B": "q8_0"}
    rounded = quantize_adapter(adapters, "llama.cpp", formats, grams=grams)
    nearest = quantize_adapter(adapters, "llama.cpp", formats)
    path = tmp_path / "a.gguf"
    types = target.write_adapter(path, adapters, INFO, "f16", quantized=rounded)
    assert types == {"blk.0.attn_q.weight.lora_a": "Q4_0", "blk.0.attn_q.weight.lora_b": "Q8_0",
                     "blk.1.attn_output.weight.lora_a": "Q5_0", "blk.1.attn_output.weight.lora_b": "Q8_0"}
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, gname in ((q, "blk.0.attn_q"), (o, "blk.1.attn_output")):
        for role, suffix in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
            t = tensors[f"{gname}.weight.{suffix}"]
            stored = rounded.stored[f"{name}.{role}"]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(stored.dequantized.shape)
            assert np.array_equal(got, stored.dequantized)  # the file holds exactly what the plan simulated
            # and those are the output-aware codes, not what the gguf package would have chosen
            assert not np.array_equal(got, nearest.stored[f"{name}.{role}"].dequantized)
        sim = rounded.simulated.modules[name]
        assert torch.equal(sim.lora_A, torch.from_numpy(rounded.stored[f"{name}.lora_A"].dequantized))
