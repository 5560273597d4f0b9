"""int4 LoRA inputs of the swappable ONNX graph (loradeploy.plugins.onnxruntime.lora_inputs): the exact
byte layout of pack_int4 and its round trip through the unpacking nodes the graph runs."""

import numpy as np
import pytest

from loradeploy.plugins.onnxruntime.lora_inputs import BLOCK, pack_int4


def _unpack(packed: np.ndarray) -> np.ndarray:
    """The documented layout, read back: low nibble first, each value stored as value + 8."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)


def test_pack_int4_nibble_order():
    q = np.array([[-8, 7, 1, -1, 0, 0], [3, -2, -8, -8, 7, 7]], np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3)
    # byte = (q[2j] + 8) | (q[2j+1] + 8) << 4
    assert packed.tolist() == [[0xF0, 0x79, 0x88], [0x6B, 0x00, 0xFF]]


def test_pack_int4_round_trip_every_value():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(5, 64), dtype=np.int8)
    q[0, :16] = np.arange(-8, 8)  # every int4 value, in both nibble positions
    q[1, :16] = np.arange(-8, 8)[::-1]
    assert np.array_equal(_unpack(pack_int4(q)), q)


def _identity_graph(role: str, n: int):
    """A one-node graph (Identity of the LoRA input X, rank a dynamic axis)."""
    from onnx import TensorProto, helper

    shape = [n, "rank"] if role == "lora_A" else ["rank", n]
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("role,n", [("lora_B", 64), ("lora_A", 40)])
def test_graph_unpacks_what_pack_int4_wrote(role, n):
    """A one-node graph (Identity of the LoRA input) lowered to int4: onnxruntime rebuilds
    q · scale per 32-block from pack_int4's bytes (padded rows cut back to n)."""
    import onnxruntime as ort

    from loradeploy.plugins.onnxruntime.lora_inputs import lower_inputs

    r = 3
    model = _identity_graph(role, n)
    lower_inputs(model, {"X": ("int4", role, n)})
    cols = n + (-n) % BLOCK
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(r, cols), dtype=np.int8)
    scale = rng.uniform(0.5, 2.0, size=(r, cols // BLOCK)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X.int4": pack_int4(q), "X.scale": scale})
    want = (q.astype(np.float32) * np.repeat(scale, BLOCK, axis=1))[:, :n]  # rank-major [r, n]
    assert np.array_equal(y, want.T if role == "lora_A" else want)


@pytest.mark.parametrize("role,n", [("lora_B", 64), ("lora_A", 40)])
def test_graph_rebuilds_lut4_from_its_levels(role, n):
    """lut4: the same packing, a Gather from the tensor's own 16 levels instead of int4's − 8."""
    import onnxruntime as ort

    from loradeploy.quant.formats import quantize
    from loradeploy.plugins.onnxruntime.lora_inputs import input_arrays, lower_inputs

    r = 3
    model = _identity_graph(role, n)
    lower_inputs(model, {"X": ("lut4", role, n)})
    x = np.random.default_rng(2).standard_normal((r, n)).astype(np.float32)  # rank-major
    stored = quantize(x, "lut4")
    feeds = input_arrays("X", role, "lut4", stored)
    assert set(feeds) == {"X.lut4", "X.scale", "X.levels"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feeds)
    want = stored.dequantized
    assert np.array_equal(y, want.T if role == "lora_A" else want)
