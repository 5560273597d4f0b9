"""Round-trip error bounds of every quantizer, and that the clipping search beats min/max."""

import numpy as np
import pytest

from loradeploy.plugins.llama_cpp import formats as ggml
from loradeploy.quant import formats
from loradeploy.quant.formats import BLOCK, quantize


def _matrix(rows=16, cols=256, seed=0, heavy_tail=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if heavy_tail:  # a few outliers per row, as trained LoRA factors have
        x[:, ::37] *= 6
    return x * 0.02


def _minmax_mse(x, qmax, qmin, group):
    g = x.reshape(-1, group).astype(np.float64)
    s = np.abs(g).max(1, keepdims=True) / qmax
    return float(((np.clip(np.rint(g / s), qmin, qmax) * s - g) ** 2).mean())


@pytest.mark.parametrize("fmt,rel", [("fp32", 0.0), ("f32", 0.0), ("fp16", 2 ** -11), ("f16", 2 ** -11), ("bf16", 2 ** -8)])
def test_float_formats_relative_error(fmt, rel):
    x = _matrix()
    q = quantize(x, fmt)
    assert q.dequantized.dtype == np.float32 and q.dequantized.shape == x.shape
    tiny = 2.0 ** -24 if fmt in ("fp16", "f16") else 1e-38  # fp16 subnormal spacing
    assert np.all(np.abs(q.dequantized - x) <= rel * np.abs(x) + tiny)
    assert q.nbytes == x.size * (4 if fmt in ("fp32", "f32") else 2)


def test_int8_per_row_bound_and_clipping_beats_minmax():
    x = _matrix()
    q = quantize(x, "int8")
    s = q.payload["scale"][:, None]
    err = np.abs(q.dequantized - x)
    clipped = np.abs(x) > 127 * s
    # values inside the clipping range are within half a step; the rest lose only what was clipped
    assert np.all(err[~clipped] <= s.repeat(x.shape[1], 1)[~clipped] / 2 * (1 + 1e-5))
    assert np.all(err[clipped] <= (np.abs(x) - 127 * s.repeat(x.shape[1], 1))[clipped] * (1 + 1e-5) + 1e-7)
    mse = float(((q.dequantized - x) ** 2).mean())
    assert mse <= _minmax_mse(x, 127, -127, x.shape[1]) * (1 + 1e-6)  # float32 rounding of the sum
    assert q.nbytes == x.size + 4 * x.shape[0]
    assert q.payload["q"].dtype == np.int8 and np.abs(q.payload["q"]).max() <= 127


def test_int4_blocks_bound_and_clipping_beats_minmax():
    x = _matrix(cols=250)  # not whole blocks: padded, padding dropped again
    q = quantize(x, "int4")
    assert q.dequantized.shape == x.shape
    assert q.payload["q"].min() >= -8 and q.payload["q"].max() <= 7
    padded = np.concatenate([x, np.zeros((x.shape[0], 6), np.float32)], 1)
    mse_opt = float(((np.concatenate([q.dequantized, np.zeros((x.shape[0], 6), np.float32)], 1) - padded) ** 2).mean())
    assert mse_opt <= _minmax_mse(padded, 7, -8, BLOCK) * (1 + 1e-6)
    rel = np.linalg.norm(q.dequantized - x) / np.linalg.norm(x)
    assert rel < 0.2  # heavy-tailed rows: a 4-bit grid of 16 levels per 32 values
    assert q.nbytes == x.shape[0] * 256 // 2 + 4 * x.shape[0] * 8


@pytest.mark.parametrize("fmt,rel_max", [("q8_0", 0.01), ("q5_0", 0.09), ("q4_0", 0.2)])
def test_ggml_types_round_trip_through_gguf(fmt, rel_max):
    import gguf

    x = _matrix(cols=256)
    q = quantize(x, fmt)
    qtype = gguf.GGMLQuantizationType[ggml.GGML_FORMATS[fmt]]
    # the stored form, quantized by the gguf package, gives exactly the values the plan measured
    data = gguf.quants.quantize(q.payload["clipped"], qtype)
    assert np.array_equal(gguf.quants.dequantize(data, qtype).reshape(x.shape), q.dequantized)
    assert q.nbytes == data.nbytes
    plain = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
    assert ((q.dequantized - x) ** 2).sum() <= ((plain - x) ** 2).sum() * (1 + 1e-6)
    assert np.linalg.norm(q.dequantized - x) / np.linalg.norm(x) < rel_max


def test_ggml_types_need_whole_blocks():
    from loradeploy.errors import LoradeployError

    with pytest.raises(LoradeployError, match="whole 32-blocks"):
        quantize(_matrix(cols=40), "q8_0")


def test_format_for_bits():
    from loradeploy import registry

    by_bits = {name: registry.get(name).storage.by_bits for name in registry.names()}
    assert formats.format_for_bits(by_bits["onnxruntime"], 8) == "int8"
    assert formats.format_for_bits(by_bits["onnxruntime"], 2) == "int4"  # lowest available
    assert formats.format_for_bits(by_bits["llama.cpp"], 16) == "f16"
    assert formats.format_for_bits(by_bits["bitsandbytes"], 4) == "fp16"


@pytest.mark.parametrize("cols", [256, 250])
def test_lut4_levels_never_worse_than_int4(cols):
    """Learned levels (Lloyd-Max from int4's grid, on int4's block scales): the round-trip error is
    at most int4's on every tensor — strictly less on these heavy-tailed rows — for 16 float
    levels (64 bytes) more; indices are 4-bit."""
    x = _matrix(cols=cols)
    a, b = quantize(x, "int4"), quantize(x, "lut4")
    err_a, err_b = float(((a.dequantized - x) ** 2).sum()), float(((b.dequantized - x) ** 2).sum())
    assert err_b <= err_a * (1 + 1e-6) and err_b < 0.99 * err_a
    assert b.nbytes == a.nbytes + 64
    assert b.payload["q"].min() >= -8 and b.payload["q"].max() <= 7 and b.payload["levels"].shape == (16,)
    assert np.all(np.diff(b.payload["levels"]) >= 0)
    levels = b.payload["levels"][b.payload["q"].astype(np.int64) + 8]
    rebuilt = (levels.reshape(x.shape[0], -1, BLOCK) * b.payload["scale"][..., None]).reshape(x.shape[0], -1)[:, :cols]
    assert np.array_equal(rebuilt.astype(np.float32), b.dequantized)


@pytest.mark.parametrize("fmt", sorted(ggml.GGML_CODES))
def test_ggml_blocks_are_what_gguf_reads(fmt):
    """Blocks written from chosen codes and scales dequantize, by the gguf package's own reader
    of llama.cpp's layouts, to code × f16(scale) exactly, including both ends of the code range."""
    import gguf

    lo, hi = ggml.GGML_CODES[fmt]
    rng = np.random.default_rng(5)
    codes = rng.integers(lo, hi + 1, size=(5, 96))
    codes[0, :2] = lo, hi
    scales = rng.standard_normal((5, 3)).astype(np.float16)
    blocks = ggml.ggml_blocks(codes, scales, fmt)
    qtype = gguf.GGMLQuantizationType[ggml.GGML_FORMATS[fmt]]
    assert blocks.dtype == np.uint8 and blocks.nbytes == gguf.quants.quantize(np.zeros((5, 96), np.float32), qtype).nbytes
    expect = codes.astype(np.float32) * np.repeat(scales.astype(np.float32), 32, axis=1)
    assert np.array_equal(gguf.quants.dequantize(blocks, qtype), expect)


@pytest.mark.parametrize("fmt", sorted(ggml.GGML_CODES))
def test_ggml_scales_never_worse_than_ggml_own(fmt):
    """The chosen f16 scale per block (clip search, both signs) has no more round-trip error
    than the gguf package's quantizer on the same block, and less on some."""
    import gguf

    lo, hi = ggml.GGML_CODES[fmt]
    rng = np.random.default_rng(6)
    x = rng.standard_t(3, size=(64, 32))
    d = ggml.ggml_scales(x, fmt)
    ours = ((np.clip(np.rint(x / d[:, None]), lo, hi) * d[:, None] - x) ** 2).sum(1)
    qtype = gguf.GGMLQuantizationType[ggml.GGML_FORMATS[fmt]]
    theirs = ((gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), qtype), qtype) - x) ** 2).sum(1)
    assert np.all(ours <= theirs * (1 + 1e-6)) and np.any(ours < theirs * (1 - 1e-3))


def test_activation_rounding_is_ggmls_q8_0_and_f16():
    """llama.cpp multiplies a block-typed weight with its input quantized to Q8_0 (an F16 weight
    with the input in f16): round_activations gives what the gguf package's own Q8_0
    quantize → dequantize gives, except at exact ties (ggml's SIMD rounds half to even)."""
    import torch
    from gguf import GGMLQuantizationType, dequantize, quantize as gguf_quantize

    x = _matrix(8, 256, seed=3) * 50  # activations: larger, with outliers
    x[2, :32] = 0.0  # an all-zero block keeps its zeros
    ours = formats.round_activations(torch.from_numpy(x), "q8_0").numpy()
    theirs = dequantize(gguf_quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, theirs)
    assert np.abs(ours - x).max() > 0  # it did round
    assert np.array_equal(formats.round_activations(torch.from_numpy(x), "f16").numpy(), x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="whole 32-blocks"):
        formats.round_activations(torch.zeros(2, 40), "q8_0")


ALL_FORMATS = ("fp32", "f32", "fp16", "f16", "bf16", "int8", "int4", "lut4", *ggml.GGML_FORMATS)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (8, 384), (5, 100), (16, 1536)])
def test_stored_bytes_from_the_shape_are_what_quantize_stores(fmt, shape):
    if not formats.fits(fmt, shape[1]):
        with pytest.raises(formats.LoradeployError, match="whole 32-blocks"):
            formats.stored_bytes(shape, fmt)
        return
    x = _matrix(*shape, seed=shape[1])
    assert formats.stored_bytes(shape, fmt) == quantize(x, fmt).nbytes


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_row_wise_formats_quantize_the_first_rows_alone_as_with_the_rest(fmt):
    """What lets the plan search quantize a module's truncated lora_A once for every rank: the
    first k rows come out bit for bit the same. lut4 fits its levels to the whole tensor."""
    x = _matrix(12, 384, seed=3)
    whole = quantize(x, fmt).dequantized
    first = quantize(x[:5], fmt).dequantized
    if fmt in formats.ROW_WISE:
        np.testing.assert_array_equal(first, whole[:5])
    else:
        assert not np.array_equal(first, whole[:5])
