"""Reading tensor files safely: safetensors first, pickles only with ``weights_only=True``.

The file kind is sniffed from its first bytes, not its name, so a mislabelled file gets a
message about what it really is.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from pathlib import Path

import torch

from .errors import AdapterFileError

_ZIP_MAGIC = b"PK\x03\x04"
_GGUF_MAGIC = b"GGUF"


def sniff(path: Path) -> str:
    """Return ``"safetensors"``, ``"torch-zip"``, ``"pickle"``, ``"gguf"``, ``"json"`` or
    ``"unknown"`` from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(_GGUF_MAGIC):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":  # before pickles: a header length may start with 0x80
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO
        return "pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len + 8 > size:
        raise AdapterFileError(
            path, f"truncated safetensors file (header claims {header_len} bytes, file has {size})"
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(path, f"corrupt or truncated safetensors file ({_first_line(e)})") from e


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 3": stderr is for our one line
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise AdapterFileError(
            path,
            "refused to unpickle: the file holds objects other than tensors "
            f"({_unsafe_global(e)}); loradeploy only reads plain state dicts (weights_only=True). "
            "Convert it to safetensors in a trusted environment.",
        ) from e
    except Exception as e:  # a damaged file makes torch.load raise almost anything  # noqa: BLE001
        raise AdapterFileError(path, f"corrupt or truncated PyTorch file ({_first_line(e)})") from e
    if isinstance(obj, dict) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise AdapterFileError(path, f"expected a non-empty dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise AdapterFileError(path, f"entry {bad[0]!r} is not a tensor: expected a flat state dict")
    return obj


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` file (safetensors, or a PyTorch state dict read with
    ``weights_only=True``). Raises :class:`AdapterFileError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise AdapterFileError(path, "empty file (0 bytes)")
    kind = sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind in ("torch-zip", "pickle"):
        return _load_pickle(path)
    what = {"gguf": "a GGUF file", "json": "a JSON file"}.get(kind, "not a tensor file")
    raise AdapterFileError(path, f"{what}: expected safetensors or a PyTorch state dict")


def load_json(path: Path) -> dict:
    """Read a JSON object, raising :class:`AdapterFileError` naming the file when it is not."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, huge integers
        raise AdapterFileError(path, f"not valid JSON ({_first_line(e)})") from e
    if not isinstance(obj, dict):
        raise AdapterFileError(path, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _unsafe_global(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")[:160]
    return "unsupported pickle content"
