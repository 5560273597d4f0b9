"""The int8 bundle's base, in two of onnxruntime's own quantization tools:

1. the word embedding (the Gather reading the token ids from a constant table, the largest tensor:
   30522 × 384 in MiniLM) in 4-bit blocks along the hidden axis, asymmetric (a scale and a 4-bit zero
   point per block): ``MatMulNBitsQuantizer`` with ``Gather`` as its op type writes a ``com.microsoft``
   ``GatherBlockQuantized``, which onnxruntime-web's wasm build runs (the LM bundle's tied head uses it);
2. ``quantize_dynamic`` for the rest (int8 weights per channel, activations quantized per call:
   MatMulInteger, DynamicQuantizeLinear — kernels the wasm build has; the small position and token-type
   embeddings become uint8 + DequantizeLinear), with every node that reads a graph input other than
   the token ids left fp32 (the LoRA paths, the LayerNorms, the head), so adapters keep their fp32
   values.

The ONNX Runtime plugin quantizes MatMuls the same way; a plugin imports no other, so these few lines
are its own."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

#: the word embedding's blocks: values per scale along the hidden axis. On MiniLM's 500 shipped eval
#: texts (onnxruntime CPU, the embedding alone quantized) mean |Δlogit| 0.012 at 32, 0.015 at 64,
#: 0.018 at 128 (uint8 with one scale: 0.004); the bundle's int8 MatMuls add 0.04 either way.
EMBEDDING_BITS, EMBEDDING_BLOCK, EMBEDDING_SYMMETRIC = 4, 32, False
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "GatherBlockQuantized")


def nodes_reading(path: Path, inputs: set[str]) -> list[str]:
    """Nodes reading any of ``inputs`` (and the MatMul a Gemm among them becomes when quantized)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [n.name for n in model.graph.node if inputs.intersection(n.input)]
    return names + [f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm" and n.name in names]


def token_embedding(model, token_ids: str) -> str | None:
    """The name of the Gather that reads ``token_ids`` from a constant table (None: there is none)."""
    tables = {i.name for i in model.graph.initializer}
    return next((n.name for n in model.graph.node
                 if n.op_type == "Gather" and n.input[1] == token_ids and n.input[0] in tables), None)


def _embedding_in_blocks(model, token_ids: str):
    """``model`` with its word-embedding Gather as a 4-bit GatherBlockQuantized (as it is without one)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    embedding = token_embedding(model, token_ids)
    if embedding is None:
        return model
    others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name != embedding]
    quantizer = MatMulNBitsQuantizer(model, bits=EMBEDDING_BITS, block_size=EMBEDDING_BLOCK,
                                     is_symmetric=EMBEDDING_SYMMETRIC,
                                     op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                     nodes_to_exclude=others)
    quantizer.process()
    return quantizer.model.model


def _embedding_record(model) -> dict | None:
    """What the written base's GatherBlockQuantized holds (read back from the graph)."""
    import onnx

    node = next((n for n in model.graph.node if n.op_type == "GatherBlockQuantized"), None)
    if node is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = next(i for i in model.graph.initializer if i.name == node.input[0])
    return {"node": node.name, "op": node.op_type, "dtype": onnx.helper.tensor_dtype_to_np_dtype(data.data_type).name,
            "shape": list(data.dims), "block_size": int(attrs["block_size"]),
            "quantize_axis": int(attrs.get("quantize_axis", 1)), "zero_points": len(node.input) > 3}


def quantize_int8(src: Path, dst: Path, keep_fp32_inputs: set[str], token_ids: str = "input_ids") -> dict:
    """``src`` (fp32) quantized into ``dst``; what the base now holds per dtype, the quantized ops
    and the word embedding's blocks (``token_embedding``, None when no Gather reads ``token_ids``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # both tools log advice and every node at INFO/WARNING on every call
    try:
        blocked = _embedding_in_blocks(onnx.load(str(src)), token_ids)
        quantize_dynamic(blocked, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=nodes_reading(src, keep_fp32_inputs),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(level)
    model = onnx.load(str(dst))
    dtypes: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        dtypes[kind] = dtypes.get(kind, 0) + int(np.prod(init.dims))
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    return {"base_parameters_by_dtype": dtypes, "quantized_ops": ops, "token_embedding": _embedding_record(model)}
