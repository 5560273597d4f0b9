"""Quantized LoRA graph inputs for the swappable ONNX graph (runtime side: no PyTorch).

A LoRA input ``X`` (``P.lora_A [in, r]`` or ``P.lora_B [r, out]``, fp32) can be stored lower;
the graph then takes the stored form as inputs and rebuilds ``X`` in front of its MatMul:

* ``fp16``: ``X.fp16`` (same layout) → Cast;
* ``int8``: ``X.int8`` (same layout) and ``X.scale`` (one per rank) → DequantizeLinear
  (per-axis, opset 13);
* ``int4``: ``X.int4`` uint8, two values per byte (low nibble first, stored as value + 8) of the
  rank-major matrix ``[r, n]`` padded to whole 32-blocks, and ``X.scale [r, n/32]`` → unpacked
  with BitShift/Concat/Reshape, scaled per block (onnxruntime's adapter files do not take the
  int4 element type, so the packing is explicit);
* ``lut4``: the same packing of 4-bit indices (``X.lut4``), the block scales, and ``X.levels [16]``,
  the tensor's own learned levels → a Gather from the levels replaces int4's ``− 8``.

The rank stays a dynamic axis and every input has an empty rank-0 default, as for fp32.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def _rank_major(role: str, graph_array: np.ndarray) -> np.ndarray:
    return graph_array.T if role == "lora_A" else graph_array


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], shape [r, C] (C even) → uint8 [r, C/2], low nibble first."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def input_arrays(name: str, role: str, fmt: str, stored) -> dict[str, np.ndarray]:
    """The adapter-file tensors for one LoRA input ``name`` from a quantized tensor ``stored``
    (a :class:`~loradeploy.quant.formats.Quantized` of the rank-major matrix)."""
    if fmt in ("fp32", "fp16"):
        v = stored.payload["values"]
        v = v.T if role == "lora_A" else v
        return {name if fmt == "fp32" else f"{name}.fp16": np.ascontiguousarray(v)}
    if fmt == "int8":
        q = stored.payload["q"]
        return {f"{name}.int8": np.ascontiguousarray(q.T if role == "lora_A" else q),
                f"{name}.scale": stored.payload["scale"].astype(np.float32)}
    if fmt == "int4":
        return {f"{name}.int4": pack_int4(stored.payload["q"]),
                f"{name}.scale": np.ascontiguousarray(stored.payload["scale"], dtype=np.float32)}
    if fmt == "lut4":
        return {f"{name}.lut4": pack_int4(stored.payload["q"]),
                f"{name}.scale": np.ascontiguousarray(stored.payload["scale"], dtype=np.float32),
                f"{name}.levels": np.ascontiguousarray(stored.payload["levels"], dtype=np.float32)}
    raise ValueError(f"format {fmt!r} has no ONNX LoRA input form")


def default_arrays(name: str, role: str, fmt: str, n: int) -> dict[str, np.ndarray]:
    """Rank-0 defaults (no adapter active) for an input of row length ``n`` (in or out)."""
    shape = (n, 0) if role == "lora_A" else (0, n)
    if fmt == "fp32":
        return {name: np.zeros(shape, np.float32)}
    if fmt == "fp16":
        return {f"{name}.fp16": np.zeros(shape, np.float16)}
    if fmt == "int8":
        return {f"{name}.int8": np.zeros(shape, np.int8), f"{name}.scale": np.zeros(0, np.float32)}
    cols = n + (-n) % BLOCK
    if fmt == "lut4":
        return {f"{name}.lut4": np.zeros((0, cols // 2), np.uint8),
                f"{name}.scale": np.zeros((0, cols // BLOCK), np.float32),
                f"{name}.levels": np.zeros(16, np.float32)}
    return {f"{name}.int4": np.zeros((0, cols // 2), np.uint8),
            f"{name}.scale": np.zeros((0, cols // BLOCK), np.float32)}


def lower_inputs(model, formats: dict[str, tuple[str, str, int]]) -> None:
    """Rewrite the onnx ``model`` in place: each graph input ``name`` in ``formats``
    (→ (format, role, n)) that is not fp32 is replaced by its stored form and the nodes
    rebuilding it."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    new_nodes, consts = [], {}

    def const(value: np.ndarray, hint: str) -> str:
        key = f"lora_lowering.{hint}"
        if key not in consts:
            consts[key] = numpy_helper.from_array(value, key)
        return key

    for name, (fmt, role, n) in sorted(formats.items()):
        if fmt == "fp32":
            continue
        old = inputs[name]
        dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
        graph.input.remove(old)
        if fmt == "fp16":
            graph.input.append(helper.make_tensor_value_info(f"{name}.fp16", TensorProto.FLOAT16, dims))
            new_nodes.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT,
                                              name=f"{name}/cast"))
            continue
        rank_axis = 1 if role == "lora_A" else 0
        rank_dim = dims[rank_axis]
        if fmt == "int8":
            graph.input.append(helper.make_tensor_value_info(f"{name}.int8", TensorProto.INT8, dims))
            graph.input.append(helper.make_tensor_value_info(f"{name}.scale", TensorProto.FLOAT, [rank_dim]))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name],
                                              axis=rank_axis, name=f"{name}/dequantize"))
            continue
        if fmt not in ("int4", "lut4"):
            raise ValueError(f"format {fmt!r} has no ONNX LoRA input form")
        cols = n + (-n) % BLOCK
        nb = cols // BLOCK
        packed = f"{name}.{fmt}"
        graph.input.append(helper.make_tensor_value_info(packed, TensorProto.UINT8, [rank_dim, cols // 2]))
        graph.input.append(helper.make_tensor_value_info(f"{name}.scale", TensorProto.FLOAT, [rank_dim, nb]))
        four = const(np.array(4, np.uint8), "four")
        last = const(np.array([-1], np.int64), "last_axis")
        p = f"{name}/{fmt}"
        new_nodes += [
            helper.make_node("BitShift", [packed, four], [f"{p}/shl"], direction="LEFT", name=f"{p}/shl"),
            helper.make_node("BitShift", [f"{p}/shl", four], [f"{p}/lo"], direction="RIGHT", name=f"{p}/lo"),
            helper.make_node("BitShift", [packed, four], [f"{p}/hi"], direction="RIGHT", name=f"{p}/hi"),
            helper.make_node("Unsqueeze", [f"{p}/lo", last], [f"{p}/lo3"], name=f"{p}/lo3"),
            helper.make_node("Unsqueeze", [f"{p}/hi", last], [f"{p}/hi3"], name=f"{p}/hi3"),
            helper.make_node("Concat", [f"{p}/lo3", f"{p}/hi3"], [f"{p}/pairs"], axis=-1, name=f"{p}/pairs"),
            helper.make_node("Reshape", [f"{p}/pairs", const(np.array([-1, nb, BLOCK], np.int64), f"blocks_{nb}")],
                             [f"{p}/blocks"], name=f"{p}/blocks"),
        ]
        if fmt == "int4":  # stored as value + 8
            new_nodes += [
                helper.make_node("Cast", [f"{p}/blocks"], [f"{p}/float"], to=TensorProto.FLOAT, name=f"{p}/float"),
                helper.make_node("Sub", [f"{p}/float", const(np.array(8.0, np.float32), "eight")], [f"{p}/signed"],
                                 name=f"{p}/signed"),
            ]
        else:  # an index into the tensor's own 16 levels
            graph.input.append(helper.make_tensor_value_info(f"{name}.levels", TensorProto.FLOAT, [16]))
            new_nodes += [
                helper.make_node("Cast", [f"{p}/blocks"], [f"{p}/index"], to=TensorProto.INT64, name=f"{p}/index"),
                helper.make_node("Gather", [f"{name}.levels", f"{p}/index"], [f"{p}/signed"], axis=0,
                                 name=f"{p}/levels"),
            ]
        new_nodes += [
            helper.make_node("Unsqueeze", [f"{name}.scale", last], [f"{p}/scale3"], name=f"{p}/scale3"),
            helper.make_node("Mul", [f"{p}/signed", f"{p}/scale3"], [f"{p}/scaled"], name=f"{p}/scaled"),
            helper.make_node("Reshape", [f"{p}/scaled", const(np.array([-1, cols], np.int64), f"rows_{cols}")],
                             [f"{p}/rows"], name=f"{p}/rows"),
        ]
        rows = f"{p}/rows"
        if cols != n:
            new_nodes.append(helper.make_node(
                "Slice", [rows, const(np.array([0], np.int64), "zero"), const(np.array([n], np.int64), f"n_{n}"),
                          const(np.array([1], np.int64), "one")], [f"{p}/cut"], name=f"{p}/cut"))
            rows = f"{p}/cut"
        if role == "lora_A":
            new_nodes.append(helper.make_node("Transpose", [rows], [name], perm=[1, 0], name=f"{p}/transpose"))
        else:
            new_nodes.append(helper.make_node("Identity", [rows], [name], name=f"{p}/out"))
    graph.initializer.extend(consts.values())
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
