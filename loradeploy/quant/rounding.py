"""Output-aware rounding: integer codes chosen against a tensor's calibration inputs.

Rounding each value to its nearest grid point (with the MSE-optimal scales of
:mod:`.formats`) minimises the error of the *weights*. What a plan is judged on is the error of
the module's *output* on real inputs, ``‖X (Ŵ − W)ᵀ‖²``; with correlated inputs, the rounding
error of one input column can be partly cancelled by the columns not yet rounded. This is the
sequential solve of OPTQ/GPTQ (Frantar et al., 2023): columns in order, each rounded to the grid,
its error spread over the remaining columns through the Cholesky factor of the damped inverse
gram ``(XᵀX + λI)⁻¹``. The stored format is unchanged (same grid, same scales layout, same
bytes); only which codes are stored differs.

For a LoRA module the two tensors see different inputs: ``lora_A`` [r, in] sees the module's
inputs X (gram XᵀX, in × in); ``lora_B`` sees ``Z = X Aᵀ`` (gram A XᵀX Aᵀ, r × r), and when it is
stored rank-major (``(s·B)ᵀ [r, out]``, ONNX Runtime) each of its stored rows is one input
column, quantized whole by the format's own quantizer; stored ``[out, r]`` (llama.cpp) its
columns are the inputs, as for ``lora_A``. Formats rounded here: ``int8`` (one scale per stored
row), ``int4``, ``lut4`` and the GGML types ``q8_0``/``q5_0``/``q4_0`` (blocks of 32 along the
stored row; a block's scale is chosen when the solve reaches it, from the values as updated so
far; lut4 keeps the 16 levels fitted to the tensor as given; the GGML blocks are written as the
bytes llama.cpp reads, since the ``gguf`` package quantizes only from floats, with its own
codes). Float formats are not rounded.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from .formats import BLOCK, Quantized, StorageFormat, _best_clip, _blocks, _Formats, plugin_formats, quantize

#: formats whose stored codes output-aware rounding chooses (a plugin's: those with ``codes``)
ROUNDED_FORMATS = _Formats(("int8", "int4", "lut4"), lambda spec: spec.codes is not None)
#: damping of the gram's diagonal, relative to its mean: 0.1 rather than GPTQ's 0.01, since a
#: LoRA plan calibrates on few texts (64: ~1,000 token rows for 384-wide inputs). Measured on the
#: MiniLM examples' eval texts (stop 25): uniform int8 with 0.1 had less model error than with
#: 0.01 on all three adapters; on 4-bit formats it was mixed; the mean over the nine cases, equal
DAMPING = 0.1


_FACTORS: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # a plan search rounds many tensors against one gram


def _inverse_cholesky(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of the damped inverse gram, and the mask of dead inputs (zero
    variance: their weights never reach the output); cached by the gram's bytes."""
    h = np.ascontiguousarray(gram, dtype=np.float64)
    key = hashlib.blake2b(h.tobytes(), digest_size=16, person=str(h.shape).encode()[:16]).digest()
    if key not in _FACTORS:
        if len(_FACTORS) >= 512:
            _FACTORS.clear()
        _FACTORS[key] = _factor(h)
    return _FACTORS[key]


def _factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(np.diag(h).mean()) or 1.0
    h[np.diag_indices_from(h)] += DAMPING * mean
    inv = np.linalg.inv(h)
    inv = (inv + inv.T) / 2
    return np.linalg.cholesky(inv).T, dead


def _solve(w: np.ndarray, gram: np.ndarray, round_column: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """OPTQ over the columns of ``w`` [rows, C] (C inputs, gram [C, C]): ``round_column(j, w)``
    returns column j on the grid (it may read the columns not yet rounded, e.g. for a block's
    scale); returns the rounded matrix."""
    w = np.array(w, dtype=np.float64)
    u, _dead = _inverse_cholesky(gram)  # a dead input's row of u is zero: rounded to nearest, nothing spread
    out = np.zeros_like(w)
    for j in range(w.shape[1]):
        q = round_column(j, w)
        out[:, j] = q
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return out


def _nearest_level(u: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return np.abs(u[..., None] - levels).argmin(-1)


def round_along_columns(x: np.ndarray, fmt: str, gram: np.ndarray) -> Quantized:
    """``x`` [rows, C] stored with rows as the format's grouping, its C columns the inputs
    (``lora_A``), rounded against ``gram`` [C, C]."""
    rows, n = x.shape
    nearest = quantize(x, fmt)  # the layout, the bytes, and lut4's levels
    x64 = x.astype(np.float64)
    if fmt == "int8":
        scale, _, _ = _best_clip(x64, 127, -127)
        s = scale.astype(np.float64)
        deq = _solve(x64, gram, lambda j, w: np.clip(np.rint(w[:, j] / s), -127, 127) * s)
        q = np.rint(deq / s[:, None]).astype(np.int8)
        return Quantized("int8", (q.astype(np.float32) * scale[:, None]).astype(np.float32), nearest.nbytes,
                         {"q": q, "scale": scale})
    spec = plugin_formats().get(fmt)
    if spec is not None and spec.codes is not None:
        return _block_codes_along_columns(x64, spec, gram, nearest)
    if fmt not in ("int4", "lut4"):
        raise ValueError(f"output-aware rounding does not take {fmt!r}")
    nb = -(-n // BLOCK)
    scales = np.zeros((rows, nb), np.float32)
    codes = np.zeros((rows, nb * BLOCK), np.int8)
    levels = nearest.payload["levels"].astype(np.float64) if fmt == "lut4" else np.arange(-8, 8, dtype=np.float64)

    def round_column(j, w):
        b = j // BLOCK
        if j % BLOCK == 0:  # this block's scales, from its values as updated so far
            block = w[:, j:j + BLOCK]
            if block.shape[1] < BLOCK:
                block = np.pad(block, ((0, 0), (0, BLOCK - block.shape[1])))
            scales[:, b] = _best_clip(block, 7, -8)[0]
        s = scales[:, b].astype(np.float64)
        safe = np.where(s > 0, s, 1.0)
        idx = _nearest_level(w[:, j] / safe, levels)
        codes[:, j] = idx - 8
        return levels[idx] * s

    _solve(x64, gram, round_column)  # fills codes and scales
    payload = {"q": codes, "scale": scales, "columns": np.asarray(n)}
    if fmt == "lut4":
        payload["levels"] = levels.astype(np.float32)
        deq = (levels.astype(np.float32)[codes[:, :n].astype(np.int64) + 8] * scales.repeat(BLOCK, 1)[:, :n])
    else:
        deq = codes[:, :n].astype(np.float32) * scales.repeat(BLOCK, 1)[:, :n]
    return Quantized(fmt, deq.astype(np.float32), nearest.nbytes, payload)


def _block_codes_along_columns(x64: np.ndarray, spec: StorageFormat, gram: np.ndarray, nearest: Quantized) -> Quantized:
    """A plugin's block format with codes (e.g. a GGML type; rows of whole 32-blocks): a block's
    scale chosen when the solve reaches it, from its values as updated so far (the format's
    ``block_scales``, which returns scales as stored); stored as the bytes the runtime reads."""
    rows, n = x64.shape
    qmin, qmax = spec.codes
    scales = np.zeros((rows, n // BLOCK))
    codes = np.zeros((rows, n), np.int8)

    def round_column(j, w):
        b = j // BLOCK
        if j % BLOCK == 0:
            scales[:, b] = spec.block_scales(w[:, j:j + BLOCK])
        s = scales[:, b]
        codes[:, j] = np.clip(np.rint(w[:, j] / np.where(s != 0, s, 1.0)), qmin, qmax)
        return codes[:, j] * s

    _solve(x64, gram, round_column)
    blocks = spec.write_blocks(codes, scales)
    deq = codes.astype(np.float32) * np.repeat(scales.astype(np.float32), BLOCK, axis=1)
    assert blocks.nbytes == nearest.nbytes
    return Quantized(nearest.format, deq, int(blocks.nbytes), {"blocks": blocks})


def _rows_with_levels(x: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lut4 of rows ``x`` on given levels: int4's block scales, nearest level. (codes, scales, deq)"""
    rows, n = x.shape
    blocks, _ = _blocks(x.astype(np.float64))
    nb = blocks.shape[1]
    flat = blocks.reshape(-1, BLOCK)
    scale = _best_clip(flat, 7, -8)[0]
    s = scale.astype(np.float64)[:, None]
    idx = _nearest_level(flat / np.where(s > 0, s, 1.0), levels.astype(np.float64))
    deq = (levels.astype(np.float32)[idx] * scale[:, None]).reshape(rows, nb * BLOCK)[:, :n]
    return (idx - 8).astype(np.int8).reshape(rows, nb * BLOCK), scale.reshape(rows, nb), deq.astype(np.float32)


def round_along_rows(x: np.ndarray, fmt: str, gram: np.ndarray) -> Quantized:
    """``x`` [R, n] whose R stored rows are the inputs (``lora_B`` stored rank-major), rounded
    against ``gram`` [R, R]: each row quantized whole by the format, in order, its error spread
    over the rows after it."""
    nearest = quantize(x, fmt)
    parts: list[Quantized | tuple] = []
    levels = nearest.payload.get("levels")

    def round_column(j, w):
        row = np.ascontiguousarray(w[:, j][None, :], dtype=np.float32)
        if fmt == "lut4":
            codes, scale, deq = _rows_with_levels(row, levels)
            parts.append((codes, scale))
            return deq[0].astype(np.float64)
        q = quantize(row, fmt)
        parts.append(q)
        return q.dequantized[0].astype(np.float64)

    if fmt not in ROUNDED_FORMATS:
        raise ValueError(f"output-aware rounding does not take {fmt!r}")
    deq = _solve(x.T.astype(np.float64), gram, round_column).T.astype(np.float32)
    if fmt == "int8":
        payload = {"q": np.concatenate([p.payload["q"] for p in parts]),
                   "scale": np.concatenate([p.payload["scale"] for p in parts])}
    elif fmt == "int4":
        payload = {"q": np.concatenate([p.payload["q"] for p in parts]),
                   "scale": np.concatenate([p.payload["scale"] for p in parts]), "columns": np.asarray(x.shape[1])}
    else:
        payload = {"q": np.concatenate([c for c, _ in parts]), "scale": np.concatenate([s for _, s in parts]),
                   "levels": levels, "columns": np.asarray(x.shape[1])}
    return Quantized(fmt, deq, nearest.nbytes, payload)
