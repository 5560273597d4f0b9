"""GGUF weights into ``MatMulNBits`` without requantizing: the decoder of a GGUF base keeps the
GGUF's own quantized values (exactly, but for Q4_K: see below).

Re-quantizing a Q4_K_M file's weights (which are already 4-, 5-, 6- and 8-bit blocks) to int4 RTN
quantizes twice: on Gemma 3 270M the base alone then sits at a mean per-token KL of ~0.37 from its
own dequantized weights. Every block type used by the Q4_K_M mix maps onto ``MatMulNBits`` (and
``GatherBlockQuantized`` for the tied embedding) exactly:

======  ====================================  ==========================================
GGUF    value                                 MatMulNBits
======  ====================================  ==========================================
Q4_K    d·sc·q − dmin·m, q∈[0,15], blocks 32  8 bits, block 32, scale d·sc/8 (within d·sc/16 of the value)
Q5_0    d·(q−16), q∈[0,31], blocks 32         8 bits, block 32, scale d, stored q+112 (zero point 128)
Q6_K    d·sc·(q−32), q∈[0,63], blocks 16      8 bits, block 16, scale d·sc, stored q+96
Q8_0    d·q, q∈[−128,127], blocks 32          8 bits, block 32, scale d, stored q+128
======  ====================================  ==========================================

Q4_K would be exact as 4 bits with float zero points (d·sc, dmin·m/(d·sc)), which onnxruntime's CPU
kernel takes, but only on a path ~50× slower than its integer one (measured: 23.5 ms vs 0.42 ms
for 640×8192); so Q4_K goes to 8 bits on a grid 8× finer than its own, off by at most 1/16 of its
step. A node computing several tensors (packed Q/K/V) takes the smallest block of its parts. The values are recovered from
gguf-py's own dequantization of the blocks, so the layouts are read by gguf-py, not re-implemented.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import LoradeployError

EXACT = ("Q4_K", "Q5_0", "Q6_K", "Q8_0")
UNPERMUTED = ("gemma3", "qwen2", "qwen3")  # GGUF architectures whose q/k rows keep the HF order


class Blocks:
    """One GGUF tensor as ``MatMulNBits`` parts: ``q`` [rows, K] (uint8 values), ``scale`` and
    ``zero`` [rows, K/block] (``zero`` None: the default 2^(bits−1))."""

    def __init__(self, q, scale, zero, bits: int, block: int):
        self.q, self.scale, self.zero, self.bits, self.block = q, scale, zero, bits, block

    def widened(self, bits: int, block: int) -> "Blocks":
        """The same values in ``bits`` bits and blocks of ``block`` (a divisor of ours)."""
        rep = self.block // block
        scale = np.repeat(self.scale, rep, axis=1)
        zero = np.full_like(scale, 2.0 ** (self.bits - 1)) if self.zero is None else np.repeat(self.zero, rep, axis=1)
        shift = 2 ** (bits - 1) - 2 ** (self.bits - 1)  # keep q − zero the same
        return Blocks((self.q.astype(np.int32) + shift).astype(np.uint8), scale, zero + shift, bits, block)


def _unpack(raw: np.ndarray, kind: str, rows: int, cols: int) -> Blocks:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)
    if kind == "Q8_0":  # the int8 values as stored
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = (blocks[:, 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(q.reshape(rows, cols), d.reshape(rows, -1), None, 8, 32)
    values = gguf.quants.dequantize(blocks, qtype).reshape(-1, block).astype(np.float64)
    if kind == "Q5_0":
        d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
        k = np.rint(np.divide(values, d, out=np.zeros_like(values), where=d != 0))
        return Blocks((k + 128).astype(np.uint8).reshape(rows, cols), d.reshape(rows, -1).astype(np.float32),
                      None, 8, 32)
    if kind == "Q6_K":
        d = blocks[:, -2:].copy().view(np.float16).astype(np.float64)
        sc = blocks[:, -18:-2].copy().view(np.int8).astype(np.float64)
        scale = (d * sc).reshape(-1, 1)
        sub = values.reshape(-1, 16)
        k = np.rint(np.divide(sub, scale, out=np.zeros_like(sub), where=scale != 0))
        return Blocks((k + 128).astype(np.uint8).reshape(rows, cols), scale.reshape(rows, -1).astype(np.float32),
                      None, 8, 16)
    if kind == "Q4_K":  # onnxruntime's CPU kernel has no fast path for float zero points: 8 bits, grid 8× finer
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        sub = values.reshape(-1, 32)
        # d·sc/8 unless a sub-block's values reach beyond ±127 of it (a min far outside the
        # block's range, or scale 0: the constant −dmin·m): then the grid that just fits them
        step = np.maximum((d * sc.astype(np.float64)).reshape(-1, 1) / 8, np.abs(sub).max(axis=1, keepdims=True) / 127)
        k = np.clip(np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step != 0)), -128, 127)
        return Blocks((k + 128).astype(np.uint8).reshape(rows, cols), step.reshape(rows, -1).astype(np.float32),
                      None, 8, 32)
    raise LoradeployError(f"GGUF block type {kind} has no exact MatMulNBits form")


def read_blocks(reader, path: Path, names: set[str]) -> dict[str, Blocks]:
    """The GGUF tensors ``names`` (of ``reader``, a ``gguf.GGUFReader`` on ``path``) as
    :class:`Blocks`; every one must be of a type in :data:`EXACT`."""
    out = {}
    for t in reader.tensors:
        if t.name in names:
            kind = t.tensor_type.name
            if kind not in EXACT:
                raise LoradeployError(f"{path}: tensor {t.name} is {kind}; the GGUF transcoding takes {', '.join(EXACT)}")
            cols, rows = (int(x) for x in t.shape[:2])  # ggml order: [in, out]
            out[t.name] = _unpack(np.asarray(t.data), kind, rows, cols)
    missing = names - set(out)
    if missing:
        raise LoradeployError(f"{path}: no tensor {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return out


def joined(parts: list[Blocks]) -> Blocks:
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    need_zero = any(p.zero is not None for p in parts) or len({p.bits for p in parts}) > 1
    same = [p.widened(bits, block) if (p.bits, p.block) != (bits, block) or (need_zero and p.zero is None) else p
            for p in parts]
    zero = np.concatenate([p.zero for p in same]) if need_zero else None
    return Blocks(np.concatenate([p.q for p in same]), np.concatenate([p.scale for p in same]), zero, bits, block)


def packed(b: Blocks) -> np.ndarray:
    """``MatMulNBits`` B: uint8 [N, K/block, block·bits/8] (4 bits: low nibble first)."""
    rows, cols = b.q.shape
    q = b.q.reshape(rows, cols // b.block, b.block)
    if b.bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def gguf_names(reader, sites: dict[str, tuple[str, ...]]) -> tuple[str, dict[str, list[str]]]:
    """The base's architecture and, per projection MatMul node of the decoder (``sites``: node →
    Hugging Face modules) and the LM head, the GGUF tensors it computes."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    layers = int(reader.fields[f"{arch}.block_count"].contents())
    have = {t.name for t in reader.tensors}
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, layers)
    out = {}
    for node, modules in sites.items():
        out[node] = [f"{names.get_name(m)}.weight" for m in modules]
    out["/lm_head/MatMul"] = ["output.weight" if "output.weight" in have else "token_embd.weight"]
    return arch, out


def transcode_gguf(model, gguf_path: Path, sites: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """:func:`transcode` the decoder ``model`` with the GGUF file's tensors (``sites``: see
    :func:`gguf_names`). Only architectures whose GGUF rows are in the Hugging Face order."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch, tensors = gguf_names(reader, sites)
    if arch not in UNPERMUTED:
        raise LoradeployError(f"{gguf_path}: a {arch} GGUF; the GGUF transcoding takes {', '.join(UNPERMUTED)} "
                              "(llama-family converters permute the q/k rows)")
    return transcode(model, read_blocks(reader, gguf_path, {n for names in tensors.values() for n in names}),
                     tensors, gguf_path)


def transcode(model, blocks: dict[str, Blocks], tensors: dict[str, list[str]], gguf_path: Path) -> dict[str, str]:
    """In the builder's fp32 decoder ``model`` (in place): every MatMul in ``tensors`` (node → GGUF
    tensors, in output order) becomes MatMulNBits holding the GGUF's values, the embedding Gather
    of a tied head a GatherBlockQuantized on the same data. Returns node → "bits/block"."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    drop, new_inits, out = set(), [], {}
    nodes = {n.name: n for n in graph.node}
    for node_name, names in tensors.items():
        node = nodes.get(node_name)
        if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
            raise LoradeployError(f"the decoder has no MatMul {node_name} on a weight to transcode")
        b = joined([blocks[n] for n in names])
        k, n = (int(d) for d in inits[node.input[1]].dims)
        if b.q.shape != (n, k):
            raise LoradeployError(f"{gguf_path}: {', '.join(names)} hold {b.q.shape[::-1]}, {node_name} takes {(k, n)}")
        stem = node_name.strip("/").replace("/", ".")
        data, scales = f"{stem}.weight_Q{b.bits}", f"{stem}.weight_scales"
        new_inits += [numpy_helper.from_array(packed(b), data), numpy_helper.from_array(b.scale, scales)]
        inputs = [node.input[0], data, scales]
        if b.zero is not None:
            new_inits.append(numpy_helper.from_array(b.zero, f"{stem}.weight_zero_points"))
            inputs.append(f"{stem}.weight_zero_points")
        drop.add(node.input[1])
        replacement = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain="com.microsoft",
                                       K=k, N=n, bits=b.bits, block_size=b.block, accuracy_level=4)
        node.CopyFrom(replacement)
        out[node_name] = f"{b.bits}/{b.block}"
        if node_name == "/lm_head/MatMul":
            _tie_embedding(graph, b, data, scales, names[0])
    kept = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return out


def _tie_embedding(graph, b: Blocks, data: str, scales: str, name: str) -> None:
    """The embedding Gather reading the (transposed) head weight → GatherBlockQuantized on the
    head's blocks; nothing to do when the head is not tied."""
    from onnx import helper, numpy_helper

    gather = next((n for n in graph.node if n.op_type == "Gather" and "embed_tokens" in n.name), None)
    if gather is None or name != "token_embd.weight":
        return
    if b.zero is not None:
        raise LoradeployError("a tied embedding with float zero points has no GatherBlockQuantized form")
    rows = b.q.shape[0]
    shape = f"{data}/rows_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], np.int64), shape))
    transpose = next((n for n in graph.node if n.output[0] == gather.input[0]), None)
    reshape = helper.make_node("Reshape", [data, shape], [f"{data}/rows"], name="/model/embed_tokens/Reshape")
    replacement = helper.make_node("GatherBlockQuantized", [f"{data}/rows", gather.input[1], scales], list(gather.output),
                                   name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                                   bits=b.bits, block_size=b.block, gather_axis=0, quantize_axis=1)
    nodes = [n for n in graph.node if n is not transpose]
    index = next(i for i, n in enumerate(nodes) if n is gather)
    nodes[index:index + 1] = [reshape, replacement]
    del graph.node[:]
    graph.node.extend(nodes)
