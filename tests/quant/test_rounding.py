"""Output-aware rounding (loradeploy/quant/rounding.py): the stored format is the nearest
rounding's (grid, layout, bytes), its codes give less output error on correlated inputs, and
with uncorrelated inputs it is nearest rounding exactly."""

import numpy as np
import pytest
import torch

from loradeploy.ir import AdapterSet, LoraModule, Method
from loradeploy.quant.formats import BLOCK, quantize
from loradeploy.quant.plan import quantize_adapter
from loradeploy.quant.rounding import round_along_columns, round_along_rows

FORMATS = ("int8", "int4", "lut4")
GGML = ("q8_0", "q5_0", "q4_0")


def correlated_inputs(rng, rows: int, width: int) -> np.ndarray:
    """Inputs whose columns are strongly correlated (a few shared factors plus noise), as a
    transformer's hidden states are."""
    factors = rng.standard_normal((rows, 6))
    return factors @ rng.standard_normal((6, width)) + 0.1 * rng.standard_normal((rows, width))


def dequantized_from_payload(q, n: int) -> np.ndarray:
    """The values a runtime computes from what the target writes."""
    p = q.payload
    if q.format in GGML:  # the block bytes, read by the gguf package's dequantizer (llama.cpp's layout)
        import gguf

        return gguf.quants.dequantize(p["blocks"], gguf.GGMLQuantizationType[q.format.upper()])
    if q.format == "int8":
        return p["q"].astype(np.float32) * p["scale"][:, None]
    scales = np.repeat(p["scale"], BLOCK, axis=1)[:, :n]
    codes = p["q"][:, :n].astype(np.int64)
    values = p["levels"][codes + 8] if q.format == "lut4" else codes.astype(np.float32)
    return values * scales


@pytest.mark.parametrize("fmt", FORMATS + GGML)
def test_columns_as_inputs_same_format_less_output_error(fmt):
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 600, 96)
    a = rng.standard_normal((8, 96)).astype(np.float32) * 0.05
    nearest = quantize(a, fmt)
    rounded = round_along_columns(a, fmt, x.T @ x)
    assert rounded.nbytes == nearest.nbytes and rounded.dequantized.shape == a.shape
    assert np.array_equal(dequantized_from_payload(rounded, a.shape[1]), rounded.dequantized)
    err = lambda q: float(np.sum((x @ (q.dequantized - a).T) ** 2))  # noqa: E731
    assert err(rounded) < 0.8 * err(nearest)
    assert not np.array_equal(rounded.dequantized, nearest.dequantized)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_as_inputs_same_format_less_output_error(fmt):
    """lora_B stored rank-major [r, out]: its rows are the inputs (z = A x)."""
    rng = np.random.default_rng(1)
    z = correlated_inputs(rng, 600, 8)
    b = rng.standard_normal((8, 70)).astype(np.float32) * 0.05  # 70: a partial last block
    nearest = quantize(b, fmt)
    rounded = round_along_rows(b, fmt, z.T @ z)
    assert rounded.nbytes == nearest.nbytes
    assert np.array_equal(dequantized_from_payload(rounded, b.shape[1]), rounded.dequantized)
    err = lambda q: float(np.sum((z @ (q.dequantized - b)) ** 2))  # noqa: E731
    assert err(rounded) < 0.8 * err(nearest)


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_uncorrelated_inputs_give_nearest_rounding(fmt):
    """A diagonal gram spreads no error: every code is the nearest one."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    gram = np.diag(rng.uniform(0.5, 2.0, 64))
    assert np.array_equal(round_along_columns(a, fmt, gram).dequantized, quantize(a, fmt).dequantized)


def test_quantize_adapter_with_grams_simulates_what_it_stores():
    """Through quantize_adapter (ONNX Runtime's layout: B folded, rank-major): the simulated
    module is the stored codes' values, and differs from nearest rounding."""
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((48, 4)).astype(np.float32))
    adapters = AdapterSet(Method.PEFT_LORA, {"m": LoraModule("m", a, b, 0.5)})
    x = correlated_inputs(rng, 400, 64)
    formats = {"m.lora_A": "int4", "m.lora_B": "int8"}
    got = quantize_adapter(adapters, "onnxruntime", formats, grams={"m": x.T @ x})
    plain = quantize_adapter(adapters, "onnxruntime", formats)
    sim = got.simulated.modules["m"]
    assert torch.equal(sim.lora_A, torch.from_numpy(got.stored["m.lora_A"].dequantized))
    assert torch.equal(sim.lora_B, torch.from_numpy(got.stored["m.lora_B"].dequantized).T)
    assert got.nbytes == plain.nbytes
    delta = lambda q: q.simulated.modules["m"].delta_weight().numpy()  # noqa: E731
    exact = adapters.modules["m"].delta_weight().numpy()
    err = lambda q: float(np.sum((x @ (delta(q) - exact).T) ** 2))  # noqa: E731
    assert err(got) < err(plain)


@pytest.mark.parametrize("fmt", GGML)
def test_quantize_adapter_llama_cpp_layout_rounds_both_tensors_along_their_inputs(fmt):
    """llama.cpp stores lora_B [out, r] (scale folded): with r a multiple of 32 it takes a block
    type, rounded along its r columns against A XᵀX Aᵀ. The simulated module is the stored bytes'
    values, the bytes are the nearest rounding's, and the output error is lower."""
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.standard_normal((32, 64)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((48, 32)).astype(np.float32))
    adapters = AdapterSet(Method.PEFT_LORA, {"m": LoraModule("m", a, b, 0.5)})
    x = correlated_inputs(rng, 400, 64)
    formats = {"m.lora_A": fmt, "m.lora_B": fmt}
    got = quantize_adapter(adapters, "llama.cpp", formats, grams={"m": x.T @ x})
    plain = quantize_adapter(adapters, "llama.cpp", formats)
    sim = got.simulated.modules["m"]
    for role in ("lora_A", "lora_B"):
        stored = got.stored[f"m.{role}"]
        assert np.array_equal(dequantized_from_payload(stored, 0), stored.dequantized)
        assert torch.equal(getattr(sim, role), torch.from_numpy(stored.dequantized))
        assert not np.array_equal(stored.dequantized, plain.stored[f"m.{role}"].dequantized)
    assert got.nbytes == plain.nbytes
    delta = lambda q: q.simulated.modules["m"].delta_weight().numpy()  # noqa: E731
    exact = adapters.modules["m"].delta_weight().numpy()
    err = lambda q: float(np.sum((x @ (delta(q) - exact).T) ** 2))  # noqa: E731
    assert err(got) < 0.8 * err(plain)


@pytest.mark.parametrize("fmt", FORMATS + GGML)
def test_output_aware_rounding_of_the_first_rows_alone_is_the_same_where_rows_are_quantized_alone(fmt):
    """lora_A's rows (its ranks) are rounded each against the same gram, an error spread along
    its own row: the search rounds a truncated A once for every rank and slices it."""
    from loradeploy.quant.formats import ROW_WISE

    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 600, 256)
    w = (0.05 * rng.standard_normal((10, 256))).astype(np.float32)
    whole = round_along_columns(w, fmt, x.T @ x).dequantized
    first = round_along_columns(w[:4], fmt, x.T @ x).dequantized
    if fmt in ROW_WISE:
        np.testing.assert_array_equal(first, whole[:4])
    else:
        assert not np.array_equal(first, whole[:4])
