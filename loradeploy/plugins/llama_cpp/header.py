"""A GGUF file's header without decoding its metadata arrays.

``gguf.GGUFReader`` decodes every metadata value into numpy views, one per string: on Gemma 3's
vocabulary (262,144 tokens, scores and types) that takes 8-14 s per read on this machine, and every
llama.cpp export read the base's header for four scalars. What loradeploy needs from a header — a few
scalars (architecture, block and head counts), each tensor's dims, type and offset, and whether
every tensor's data lies within the file — is read here in well under a second; arrays are skipped
by their lengths. Tensor data itself is read with ``gguf.GGUFReader`` where it is needed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ...errors import BaseModelError

#: GGUF metadata value type → struct format of one value (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    dims: tuple[int, ...]  # ggml order: [in, out] for a weight
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, object]  # scalar and string values; arrays are skipped
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def extent_problem(self) -> str | None:
        """Why a tensor's data does not lie within the file (truncated, or a bad header), if so."""
        import gguf

        for name, t in self.tensors.items():
            try:
                block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
            except (ValueError, KeyError):
                return f"tensor {name} has an unknown ggml type {t.ggml_type}"
            n = math.prod(t.dims)
            if n % block:
                return f"tensor {name} is not whole {block}-blocks"
            end = self.data_start + t.offset + n // block * nbytes
            if end > self.file_size:
                return f"tensor {name} ends at byte {end:,}, past the end of the file ({self.file_size:,} bytes): truncated"
        return None


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file ``path``; a file that is not one, or ends inside its header,
    raises :class:`BaseModelError` naming it."""
    path = Path(path)
    with path.open("rb") as f:
        buf = bytearray(f.read(1 << 16))
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos, buf
            while pos + n > len(buf):
                more = f.read(max(n, 1 << 20))
                if not more:
                    raise BaseModelError(f"{path}: truncated GGUF header")
                buf += more
            pos += n
            return bytes(buf[pos - n:pos])

        def unpack(fmt: str):
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            return take(unpack("Q")).decode("utf-8", "replace")

        def skip(vtype: int) -> None:
            if vtype == _STRING:
                string()
            elif vtype == _ARRAY:
                etype, n = unpack("I"), unpack("Q")
                if etype in _SCALARS:
                    take(n * struct.calcsize(_SCALARS[etype]))
                else:
                    for _ in range(n):
                        skip(etype)
            elif vtype in _SCALARS:
                take(struct.calcsize(_SCALARS[vtype]))
            else:
                raise BaseModelError(f"{path}: bad GGUF metadata value type {vtype}")

        if take(4) != b"GGUF":
            raise BaseModelError(f"{path}: not a GGUF file (bad magic)")
        _version, n_tensors, n_kv = unpack("I"), unpack("Q"), unpack("Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key, vtype = string(), unpack("I")
            if vtype == _STRING:
                metadata[key] = string()
            elif vtype in _SCALARS:
                metadata[key] = unpack(_SCALARS[vtype])
            else:
                skip(vtype)
        tensors = {}
        for _ in range(n_tensors):
            name, n_dims = string(), unpack("I")
            dims = tuple(unpack("Q") for _ in range(n_dims))
            tensors[name] = TensorInfo(dims, unpack("I"), unpack("Q"))
    align = int(metadata.get("general.alignment", 32))
    start = -(-pos // align) * align
    return GGUFHeader(metadata, tensors, start, path.stat().st_size)
