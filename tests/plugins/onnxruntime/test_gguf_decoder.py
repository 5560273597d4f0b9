"""GGUF blocks → MatMulNBits values: exact for Q5_0 / Q6_K / Q8_0, within 1/16 of the step for Q4_K
(random blocks of each type, compared with gguf-py's own dequantization), and the packed form a
MatMulNBits node computes with in onnxruntime."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from loradeploy.plugins.onnxruntime.gguf_decoder import Blocks, _unpack, joined, packed

ROWS, COLS = 8, 512


def _random_blocks(kind: str, seed: int = 0) -> np.ndarray:
    """Random bytes in the layout of ``kind``, with finite positive f16 scales."""
    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[:, -2:] = scales[:, :2]
    else:
        raw[:, 0:2] = scales[:, :2]
        if kind == "Q4_K":
            raw[:, 2:4] = rng.uniform(0.001, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw


def _values(b: Blocks) -> np.ndarray:
    q = b.q.reshape(ROWS, -1, b.block).astype(np.float64)
    zero = 2.0 ** (b.bits - 1) if b.zero is None else b.zero[..., None]
    return ((q - zero) * b.scale[..., None].astype(np.float64)).reshape(ROWS, COLS)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q6_K", "Q4_K"])
def test_blocks_hold_the_gguf_values(kind):
    raw = _random_blocks(kind)
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(ROWS, COLS).astype(np.float64)
    b = _unpack(raw.reshape(-1), kind, ROWS, COLS)
    got = _values(b)
    assert np.abs(want).max() > 0.01
    if kind == "Q4_K":  # 8 bits on a grid 8x finer than Q4_K's (d·sc/8) where the values fit it
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float64)
        sc, _ = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16].copy())
        fine = (d * sc).reshape(ROWS, -1) / 8
        grid = b.scale.astype(np.float64)
        assert (grid >= fine * (1 - 1e-6)).all() and (np.isclose(grid, fine, rtol=1e-6)).mean() > 0.3
        assert (np.abs(got - want) <= grid.repeat(b.block, axis=1) / 2 * (1 + 1e-6)).all()
        assert np.abs(got - want).max() > 0
    else:
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_mixed_parts_join_at_the_smallest_block_and_matmulnbits_computes_them():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    parts = [_unpack(_random_blocks("Q5_0", 1).reshape(-1), "Q5_0", ROWS, COLS),
             _unpack(_random_blocks("Q6_K", 2).reshape(-1), "Q6_K", ROWS, COLS)]
    b = joined(parts)
    assert (b.bits, b.block, b.q.shape) == (8, 16, (2 * ROWS, COLS))
    w = np.concatenate([_values(p) for p in parts])  # [N, K]
    inits = [numpy_helper.from_array(packed(b), "B"), numpy_helper.from_array(b.scale, "S")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=COLS, N=2 * ROWS,
                            bits=8, block_size=16, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, COLS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * ROWS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    x = np.random.default_rng(3).standard_normal((1, COLS)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x.astype(np.float64) @ w.T).max() < 1e-4 * np.abs(x @ w.T).max()
