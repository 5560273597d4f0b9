"""Quantizers for the number formats each runtime can store a LoRA tensor in.

Every quantizer works on a 2-D float32 matrix whose *rows* are the unit the runtime groups
values by (a per-row scale for int8, blocks of 32 along the row for int4 and the GGML block
types), returns what the runtime stores (``payload``), the values the runtime will compute
with (``dequantized``) and the exact bytes stored. Integer formats choose their scales by an
MSE-optimal clipping search: per row (int8) or per block (int4, GGML types), every clip ratio
on a grid is tried and the one with the least squared error kept — not plain min/max.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LoradeployError

BLOCK = 32
#: clip ratios tried by the search (1.0 = plain absmax scaling)
CLIP_GRID = np.linspace(1.0, 0.5, 26)


@dataclass
class Quantized:
    """One tensor in one stored format."""

    format: str
    dequantized: np.ndarray  # float32, same shape as the input: what the runtime computes with
    nbytes: int  # bytes the runtime stores for it (values + scales)
    payload: dict[str, np.ndarray] = field(default_factory=dict)  # what the target writes
    clip: np.ndarray | None = None  # the clip ratio chosen per row / block (integer formats)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(self.dequantized.size, 1)


# --- float formats ---------------------------------------------------------------------------

def _float(x: np.ndarray, fmt: str) -> Quantized:
    import torch

    if fmt in ("fp32", "f32"):
        v = x.astype(np.float32)
        return Quantized(fmt, v, v.size * 4, {"values": v})
    if fmt in ("fp16", "f16"):
        v = x.astype(np.float16)
        return Quantized(fmt, v.astype(np.float32), v.size * 2, {"values": v})
    if fmt == "bf16":
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return Quantized(fmt, t.float().numpy(), t.numel() * 2, {"values_bf16": t.view(torch.int16).numpy()})
    raise LoradeployError(f"unknown float format {fmt!r}")


# --- symmetric integer formats (ONNX int8 per row, int4 blocks of 32) -------------------------

def _best_clip(x: np.ndarray, qmax: int, qmin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` is [groups, n]: per group, the scale (from a clip ratio on CLIP_GRID) with the least
    squared round-trip error. Returns (scale [groups], q [groups, n] int8, clip [groups])."""
    amax = np.abs(x).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best_err = np.full(x.shape[0], np.inf)
    best_scale = amax / qmax
    best_clip = np.ones(x.shape[0])
    for c in CLIP_GRID:
        s = c * amax / qmax
        q = np.clip(np.rint(x / s[:, None]), qmin, qmax)
        err = ((q * s[:, None] - x) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, s, best_scale)
        best_clip = np.where(better, c, best_clip)
    q = np.clip(np.rint(x / best_scale[:, None]), qmin, qmax).astype(np.int8)
    return best_scale.astype(np.float32), q, best_clip


def _int8_rows(x: np.ndarray) -> Quantized:
    scale, q, clip = _best_clip(x.astype(np.float64), 127, -127)
    deq = (q.astype(np.float32) * scale[:, None]).astype(np.float32)
    return Quantized("int8", deq, q.size + scale.size * 4, {"q": q, "scale": scale}, clip)


def _blocks(x: np.ndarray) -> tuple[np.ndarray, int]:
    rows, n = x.shape
    pad = (-n) % BLOCK
    if pad:
        x = np.concatenate([x, np.zeros((rows, pad), x.dtype)], axis=1)
    return x.reshape(rows, -1, BLOCK), pad


def _int4_blocks(x: np.ndarray) -> Quantized:
    rows, n = x.shape
    blocks, pad = _blocks(x.astype(np.float64))
    nb = blocks.shape[1]
    scale, q, clip = _best_clip(blocks.reshape(-1, BLOCK), 7, -8)
    deq = (q.astype(np.float32) * scale[:, None]).reshape(rows, nb * BLOCK)[:, :n]
    q = q.reshape(rows, nb * BLOCK)
    # two values per byte (low nibble first), scales fp32 per block
    nbytes = rows * nb * BLOCK // 2 + scale.size * 4
    return Quantized("int4", deq.astype(np.float32), nbytes,
                     {"q": q, "scale": scale.reshape(rows, nb), "columns": np.asarray(n)}, clip.reshape(rows, nb))


# --- learned levels: a 16-entry codebook per tensor on int4's block scales ----------------------

LUT_LEVELS = 16
LUT_ITERATIONS = 12


def _lut4_blocks(x: np.ndarray) -> Quantized:
    """4-bit indices into 16 levels fitted to this tensor (Lloyd-Max / weighted k-means), on the
    block scales int4 chooses. Lloyd starts from int4's own grid (−8 … 7) and every iteration
    lowers the squared error (weights scale² make the normalised problem the real one), so the
    round trip is never worse than int4's on the same tensor, for 16 float levels more."""
    rows, n = x.shape
    blocks, _ = _blocks(x.astype(np.float64))
    nb = blocks.shape[1]
    flat = blocks.reshape(-1, BLOCK)
    scale, q, _ = _best_clip(flat, 7, -8)
    s = scale.astype(np.float64)[:, None]
    safe = np.where(s > 0, s, 1.0)
    u = flat / safe  # values in units of their block's scale
    valid = (np.arange(nb * BLOCK) < n).reshape(1, nb, BLOCK).repeat(rows, 0).reshape(-1, BLOCK)
    w = np.where(valid, s ** 2, 0.0)  # squared error of a value = s² · (u − level)²; padding counts 0
    levels = np.arange(-8, 8, dtype=np.float64)
    idx = (q.astype(np.int64) + 8)
    for _ in range(LUT_ITERATIONS):
        for j in range(LUT_LEVELS):  # update: the weighted mean of each level's values
            sel = idx == j
            wsum = w[sel].sum()
            if wsum > 0:
                levels[j] = (w[sel] * u[sel]).sum() / wsum
        levels.sort()
        idx = np.abs(u[..., None] - levels).argmin(-1)  # assign: the nearest level
    levels32 = levels.astype(np.float32)
    deq = (levels32[idx] * scale[:, None]).reshape(rows, nb * BLOCK)[:, :n].astype(np.float32)
    nbytes = rows * nb * BLOCK // 2 + scale.size * 4 + LUT_LEVELS * 4
    return Quantized("lut4", deq, nbytes, {"q": (idx - 8).astype(np.int8).reshape(rows, nb * BLOCK),
                                           "scale": scale.reshape(rows, nb), "levels": levels32,
                                           "columns": np.asarray(n)})


# --- GGML block types (llama.cpp), through the gguf package's own quantizer -------------------

GGML_FORMATS = {"q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def ggml_fits(fmt: str, row_length: int) -> bool:
    """GGML block types quantize along a row in blocks of 32: the row must be whole blocks."""
    return fmt not in GGML_FORMATS or row_length % BLOCK == 0


def _ggml(x: np.ndarray, fmt: str) -> Quantized:
    import gguf

    qtype = gguf.GGMLQuantizationType[GGML_FORMATS[fmt]]
    if not ggml_fits(fmt, x.shape[1]):
        raise LoradeployError(f"{fmt} needs rows of whole {BLOCK}-blocks, got rows of {x.shape[1]}")
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


#: formats that quantize each stored row from that row alone (its scales, its codes; output-aware
#: rounding of ``lora_A`` spreads a value's error along its own row only): the first k rows of a
#: matrix come out the same quantized alone as with the rows after them. Not lut4, whose 16
#: levels are fitted to the whole tensor
ROW_WISE = ("fp32", "f32", "fp16", "f16", "bf16", "int8", "int4", *GGML_FORMATS)


def stored_bytes(shape: tuple[int, int], fmt: str) -> int:
    """The bytes :func:`quantize` stores for a [rows, n] matrix in ``fmt``, from the shape alone
    (a plan search sizes many candidate tensors it never quantizes)."""
    import gguf

    rows, n = shape
    if fmt in ("fp32", "f32"):
        return rows * n * 4
    if fmt in ("fp16", "f16", "bf16"):
        return rows * n * 2
    if fmt == "int8":  # codes + an fp32 scale per row
        return rows * n + rows * 4
    nb = -(-n // BLOCK)
    if fmt in ("int4", "lut4"):  # two codes per byte over whole blocks, an fp32 scale per block (+ 16 fp32 levels)
        return rows * nb * BLOCK // 2 + rows * nb * 4 + (LUT_LEVELS * 4 if fmt == "lut4" else 0)
    if fmt in GGML_FORMATS:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGML_FORMATS[fmt]]]
        if n % block:
            raise LoradeployError(f"{fmt} needs rows of whole {block}-blocks, got rows of {n}")
        return rows * (n // block) * size
    raise LoradeployError(f"unknown format {fmt!r}")


def quantize(x: np.ndarray, fmt: str) -> Quantized:
    """``x`` (2-D, rows = the runtime's grouping) in format ``fmt``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise LoradeployError(f"quantize expects a matrix, got shape {list(x.shape)}")
    if fmt in ("fp32", "f32", "fp16", "f16", "bf16"):
        return _float(x, fmt)
    if fmt == "int8":
        return _int8_rows(x)
    if fmt == "int4":
        return _int4_blocks(x)
    if fmt == "lut4":
        return _lut4_blocks(x)
    if fmt in GGML_FORMATS:
        return _ggml(x, fmt)
    raise LoradeployError(f"unknown quantization format {fmt!r}")


def format_for_bits(by_bits: dict[int, str], bits: int) -> str:
    """The lowest format of a runtime's ``by_bits`` table with at least ``bits`` bits (the
    table's lowest below)."""
    table = by_bits
    wide = sorted(b for b in table if b >= bits)
    return table[wide[0]] if wide else table[min(table)]


def round_activations(x: torch.Tensor, how: str | None) -> torch.Tensor:
    """``x`` (…, n) as a runtime rounds a product's input before multiplying (the weight's
    format decides, :attr:`LoraStorage.activations`): ``"f16"`` to half precision; ``"q8_0"``
    to ggml's 8-bit blocks of 32 along the last axis (per block d = max|x| / 127, codes
    round(x / d) to nearest even, d stored as f16: x̂ = code · f16(d), as ggml-cpu's
    ``quantize_row_q8_0``); None: unchanged."""
    if how is None:
        return x
    if how == "f16":
        return x.to(torch.float16).to(x.dtype)
    if how != "q8_0":
        raise ValueError(f"round_activations: unknown rounding {how!r}")
    n = x.shape[-1]
    if n % BLOCK:
        raise ValueError(f"round_activations: q8_0 needs rows of whole {BLOCK}-blocks, got {n}")
    blocks = x.reshape(*x.shape[:-1], n // BLOCK, BLOCK).to(torch.float32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv)
    return (codes * d.to(torch.float16).to(torch.float32)).reshape(x.shape).to(x.dtype)
