"""Quantizers for the number formats each runtime can store a LoRA tensor in.

Built in: the float formats and the integer formats ONNX Runtime's graph rebuilds (int8 per row,
int4 and lut4 blocks of 32); a runtime's plugin adds its own (:class:`StorageFormat`, e.g. the
GGML block types of llama.cpp). Every quantizer works on a 2-D float32 matrix whose *rows* are the unit the runtime groups
values by (a per-row scale for int8, blocks of 32 along the row for int4 and the GGML block
types), returns what the runtime stores (``payload``), the values the runtime will compute
with (``dequantized``) and the exact bytes stored. Integer formats choose their scales by an
MSE-optimal clipping search: per row (int8) or per block (int4, GGML types), every clip ratio
on a grid is tried and the one with the least squared error kept — not plain min/max.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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


# --- formats a runtime's plugin adds (registry: RuntimeSpec.formats) --------------------------

@dataclass(frozen=True)
class StorageFormat:
    """A number format a runtime's plugin adds (its :attr:`RuntimeSpec.formats` module's
    ``FORMATS``): how a [rows, n] matrix is quantized and sized, and, when output-aware rounding
    may choose its codes, the integer codes it stores with one scale per ``BLOCK`` values."""

    quantize: Callable[[np.ndarray], Quantized] = field(metadata={"help": "[rows, n] float32 → Quantized"})
    stored_bytes: Callable[[int, int], int] = field(metadata={"help": "(rows, n) → bytes stored"})
    row_block: int = field(default=1, metadata={"help": "a stored row must be whole blocks of this many values"})
    row_wise: bool = field(default=True, metadata={"help": "each row quantized from that row alone (ROW_WISE)"})
    codes: tuple[int, int] | None = field(default=None, metadata={
        "help": "(lowest, highest) code, one scale per BLOCK values: output-aware rounding may choose the codes"})
    block_scales: Callable[[np.ndarray], np.ndarray] | None = field(default=None, metadata={
        "help": "[groups, BLOCK] → one scale per group, as the runtime stores it"})
    write_blocks: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = field(default=None, metadata={
        "help": "(codes [rows, n], scales [rows, n / BLOCK]) → the bytes the runtime reads"})


def plugin_formats() -> dict[str, StorageFormat]:
    """Every format the registered runtimes' plugins add, by name."""
    from .. import registry

    return registry.storage_formats()


def fits(fmt: str, row_length: int) -> bool:
    """A plugin's block format quantizes along a row in whole blocks: the row must be whole blocks."""
    spec = plugin_formats().get(fmt)
    return spec is None or row_length % spec.row_block == 0


class _Formats:
    """The formats, built-in and added by plugins, for which ``where`` holds (``fmt in ...``)."""

    def __init__(self, builtin: tuple[str, ...], where: Callable[[StorageFormat], bool]):
        self.builtin, self.where = builtin, where

    def __contains__(self, fmt: str) -> bool:
        spec = plugin_formats().get(fmt)
        return fmt in self.builtin if spec is None else self.where(spec)

    def __iter__(self):
        return iter((*self.builtin, *(n for n, spec in plugin_formats().items() if self.where(spec))))


#: formats that quantize each stored row from that row alone (its scales, its codes; output-aware
#: rounding of ``lora_A`` spreads a value's error along its own row only): the first k rows of a
#: matrix come out the same quantized alone as with the rows after them. Not lut4, whose 16
#: levels are fitted to the whole tensor
ROW_WISE = _Formats(("fp32", "f32", "fp16", "f16", "bf16", "int8", "int4"), lambda spec: spec.row_wise)


def stored_bytes(shape: tuple[int, int], fmt: str) -> int:
    """The bytes :func:`quantize` stores for a [rows, n] matrix in ``fmt``, from the shape alone
    (a plan search sizes many candidate tensors it never quantizes)."""
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
    spec = plugin_formats().get(fmt)
    if spec is None:
        raise LoradeployError(f"unknown format {fmt!r}")
    if n % spec.row_block:
        raise LoradeployError(f"{fmt} needs rows of whole {spec.row_block}-blocks, got rows of {n}")
    return spec.stored_bytes(rows, n)


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
    spec = plugin_formats().get(fmt)
    if spec is None:
        raise LoradeployError(f"unknown quantization format {fmt!r}")
    if x.shape[1] % spec.row_block:
        raise LoradeployError(f"{fmt} needs rows of whole {spec.row_block}-blocks, got rows of {x.shape[1]}")
    return spec.quantize(x)


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
