"""The int8 bundle's base: onnxruntime's ``quantize_dynamic`` (int8 weights, activations
quantized per call: MatMulInteger, DynamicQuantizeLinear — kernels onnxruntime-web's wasm build
has), with every node that reads a graph input other than the token ids left fp32 (the LoRA
paths, the LayerNorms, the head), so adapters keep their fp32 values. The ONNX Runtime plugin
quantizes the same way; a plugin imports no other, so these few lines are its own."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np


def nodes_reading(path: Path, inputs: set[str]) -> list[str]:
    """Nodes reading any of ``inputs`` (and the MatMul a Gemm among them becomes when quantized)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [n.name for n in model.graph.node if inputs.intersection(n.input)]
    return names + [f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm" and n.name in names]


def quantize_int8(src: Path, dst: Path, keep_fp32_inputs: set[str]) -> dict:
    """``src`` (fp32) quantized into ``dst``; what the base now holds per dtype and the int8 ops."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the tool logs advice at WARNING on every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=nodes_reading(src, keep_fp32_inputs),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(level)
    model = onnx.load(str(dst))
    dtypes: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        dtypes[kind] = dtypes.get(kind, 0) + int(np.prod(init.dims))
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")})
    return {"base_parameters_by_dtype": dtypes, "quantized_ops": ops}
