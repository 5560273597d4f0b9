"""The GGML block types llama.cpp stores LoRA tensors in (``q8_0`` … ``q4_1``), as storage formats
this plugin adds to the precision plans (:class:`loradeploy.quant.formats.StorageFormat`).

Quantized through the ``gguf`` package's own quantizer, with each block's scale chosen by the same
MSE-optimal clipping search as the built-in integer formats; for output-aware rounding the block
bytes are written here from codes chosen elsewhere (the ``gguf`` package only quantizes from
floats, choosing its own codes).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ...errors import LoradeployError
from ...quant.formats import BLOCK, CLIP_GRID, Quantized, StorageFormat

GGML_FORMATS = {"q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def _ggml(x: np.ndarray, fmt: str) -> Quantized:
    import gguf

    qtype = gguf.GGMLQuantizationType[GGML_FORMATS[fmt]]
    x = x.astype(np.float32)
    rows, n = x.shape
    blocks = x.reshape(rows, n // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    best_err = np.full(amax.shape, np.inf)
    best = blocks
    best_clip = np.ones(amax.shape)
    for c in CLIP_GRID:
        clipped = np.clip(blocks, -c * amax, c * amax).astype(np.float32)
        deq = gguf.quants.dequantize(gguf.quants.quantize(clipped.reshape(rows, n), qtype), qtype)
        err = ((deq.reshape(blocks.shape).astype(np.float64) - blocks) ** 2).sum(axis=2, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, clipped, best)
        best_clip = np.where(better, c, best_clip)
    clipped = best.reshape(rows, n).astype(np.float32)
    data = gguf.quants.quantize(clipped, qtype)
    deq = gguf.quants.dequantize(data, qtype).reshape(rows, n).astype(np.float32)
    return Quantized(fmt, deq, int(data.nbytes), {"clipped": clipped}, best_clip.reshape(rows, -1))


#: the GGML types whose block is one f16 scale ``d`` and 32 integer codes (value = code · d), with
#: the codes' range; :func:`ggml_blocks` writes them from chosen codes (output-aware rounding)
GGML_CODES = {"q8_0": (-127, 127), "q5_0": (-16, 15), "q4_0": (-8, 7)}


def ggml_scales(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """Per block of ``blocks`` [groups, 32], the f16-representable scale ``d`` with the least
    squared round-trip error among clip ratios on CLIP_GRID, both for the largest value on the
    longer (negative-code) side, as ggml's own quantizer does, and on the positive side."""
    qmin, qmax = GGML_CODES[fmt]
    amax = np.abs(blocks).max(axis=1)
    signed = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    candidates = np.concatenate([CLIP_GRID[None, :] * signed[:, None] / qmin,
                                 CLIP_GRID[None, :] * amax[:, None] / qmax], axis=1)  # [groups, K]
    d = candidates.astype(np.float16).astype(np.float64)
    safe = np.where(d != 0, d, 1.0)
    q = np.clip(np.rint(blocks[:, None, :] / safe[..., None]), qmin, qmax)
    err = ((q * d[..., None] - blocks[:, None, :]) ** 2).sum(axis=2)
    return d[np.arange(len(d)), err.argmin(axis=1)]


def ggml_blocks(codes: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """The bytes llama.cpp stores for GGML type ``fmt`` (block layouts of ggml-common.h) holding
    ``codes`` [rows, n] (ints within ``GGML_CODES[fmt]``) with one scale per block of 32,
    ``scales`` [rows, n / 32] (stored as f16): uint8 [rows, bytes per row], the form gguf's
    writer takes for a quantized tensor. The ``gguf`` package only quantizes from floats, choosing
    its own codes; this writes codes chosen elsewhere."""
    rows, n = codes.shape
    c = codes.reshape(rows, n // BLOCK, BLOCK).astype(np.int32)
    d = np.ascontiguousarray(scales, dtype="<f2").reshape(rows, -1, 1).view(np.uint8)
    if fmt == "q8_0":
        body = c.astype(np.int8).view(np.uint8)
    elif fmt == "q4_0":  # element j in the low nibble of byte j, element j + 16 in its high nibble
        u = (c + 8).astype(np.uint8)
        body = u[..., :16] | (u[..., 16:] << 4)
    elif fmt == "q5_0":  # the low nibbles as q4_0, then the fifth bit of element j in bit j of a u32
        u = (c + 16).astype(np.uint32)
        high = (((u >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
        low = (u & 0xF).astype(np.uint8)
        body = np.concatenate([high.astype("<u4")[..., None].view(np.uint8), low[..., :16] | (low[..., 16:] << 4)],
                              axis=2)
    else:
        raise LoradeployError(f"no block layout for {fmt!r} (block types with chosen codes: {', '.join(GGML_CODES)})")
    return np.concatenate([d, body], axis=2).reshape(rows, -1)


def _stored_bytes(fmt: str, rows: int, n: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGML_FORMATS[fmt]]]
    return rows * (n // block) * size


#: what the plans may store in: every GGML type by name; the ones with one f16 scale and plain
#: codes per block may have their codes chosen by output-aware rounding
FORMATS = {fmt: StorageFormat(quantize=partial(_ggml, fmt=fmt), stored_bytes=partial(_stored_bytes, fmt),
                              row_block=BLOCK, row_wise=True, codes=GGML_CODES.get(fmt),
                              block_scales=partial(ggml_scales, fmt=fmt) if fmt in GGML_CODES else None,
                              write_blocks=partial(ggml_blocks, fmt=fmt) if fmt in GGML_CODES else None)
           for fmt in GGML_FORMATS}
