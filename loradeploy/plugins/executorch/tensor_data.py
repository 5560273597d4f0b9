"""Tensors in ExecuTorch's tensor-data format (``.ptd``, the FlatTensor file an app opens with the
runtime's named-data-map API). Every tensor is a named entry keyed by its method input
(``<module>.lora_A`` …); one more entry, :data:`META_KEY`, holds JSON metadata (the format, the
base's fingerprint, the adapter's name) as plain bytes.

Written with executorch's own serializer (``NamedDataStore`` + ``FlatTensorSerializer``). Read
with executorch's ``FlatTensorHeader`` for the extended header and the ``flatbuffers`` library's
tables for the FlatTensor table: executorch's deserializer runs the ``flatc`` binary in a
subprocess (5–11 ms an adapter, most of an adapter load), its runtime's ``FlatTensorDataMap`` has no
Python binding (1.5.1), and it ships no generated Python accessors for this schema."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ...errors import BaseModelError
from . import FORMAT, FORMAT_VERSION, META_KEY

TENSOR_ALIGNMENT = 16
#: flat_tensor.fbs's ``file_identifier``, at bytes 4..8 of the file
FILE_IDENTIFIER = b"FT01"
# what the flatbuffers library raises reading offsets that point outside the buffer or nowhere sensible
_CORRUPT = (struct.error, IndexError, TypeError, ValueError, OverflowError, UnicodeDecodeError)


def write_tensor_data(tensors: dict[str, np.ndarray], path: Path, metadata: dict) -> int:
    """``tensors`` (float32) and ``metadata`` into the ``.ptd`` at ``path``; its size in bytes."""
    import torch
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize.data_serializer import DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    store = NamedDataStore()
    tag = "adapter"
    for name, arr in sorted(tensors.items()):
        store.add_named_data(name, torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)),
                             alignment=TENSOR_ALIGNMENT, external_tag=tag)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    store.add_named_data(META_KEY, json.dumps(meta, sort_keys=True).encode(), external_tag=tag)
    out = store.get_named_data_store_output()
    blob = FlatTensorSerializer().serialize(DataPayload(buffers=out.buffers, named_data=out.external_data[tag]))
    with open(path, "wb") as f:
        blob.write_to_file(f)
    return Path(path).stat().st_size


class Layout(NamedTuple):
    """A named entry's tensor layout (flat_tensor.fbs ``TensorLayout``)."""

    scalar_type: int
    sizes: tuple[int, ...]
    dim_order: tuple[int, ...]


class NamedEntry(NamedTuple):
    """One named entry of a ``.ptd``: its bytes are ``data[start:start + size]`` of the file."""

    key: str
    start: int
    size: int
    layout: Layout | None


def read_tensor_data(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of a ``.ptd`` written by :func:`write_tensor_data`; a file that is
    not one is a :class:`BaseModelError` naming it."""
    from executorch.exir.scalar_type import ScalarType

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BaseModelError(f"{path}: cannot read it ({e.strerror or e})") from e
    tensors, meta = {}, None
    for entry in named_entries(path, data):
        if entry.key == META_KEY:
            meta = _metadata(path, data[entry.start:entry.start + entry.size])
            continue
        layout = entry.layout
        if layout is None or layout.scalar_type != ScalarType.FLOAT:
            raise BaseModelError(f"{path}: entry {entry.key} is not a float32 tensor")
        if not _contiguous(layout):
            raise BaseModelError(f"{path}: entry {entry.key} has shape {list(layout.sizes)} in dim order "
                                 f"{list(layout.dim_order)}, not a contiguous one")
        count = math.prod(layout.sizes)
        if entry.size < 4 * count:
            raise BaseModelError(f"{path}: entry {entry.key} holds {entry.size} bytes, its shape {list(layout.sizes)} "
                                 f"needs {4 * count}")
        tensors[entry.key] = np.frombuffer(data, np.float32, count, entry.start).reshape(layout.sizes).copy()
    if meta is None:
        raise BaseModelError(f"{path}: no {META_KEY} entry (not written by loradeploy's ExecuTorch target)")
    return tensors, meta


def named_entries(path: Path, data: bytes) -> list[NamedEntry]:
    """The named entries of the ``.ptd`` ``data`` (the bytes of ``path``), each checked to lie in
    the file; a file whose header or FlatTensor table is not one is a :class:`BaseModelError`."""
    from executorch.extension.flat_tensor.serialize.serialize import _FLAT_TENSOR_VERSION, FlatTensorHeader
    from flatbuffers.util import BufferHasIdentifier

    def bad(problem: str) -> BaseModelError:
        return BaseModelError(f"{path}: not an ExecuTorch tensor-data file ({problem})")

    try:
        header = FlatTensorHeader.from_bytes(data[8:8 + FlatTensorHeader.EXPECTED_LENGTH])
    except ValueError as e:
        raise bad(str(e)) from e
    if not header.is_valid():
        raise bad(f"no FlatTensor header: magic {header.magic!r}, length {header.length}")
    if not BufferHasIdentifier(data, 0, FILE_IDENTIFIER):
        raise bad(f"flatbuffer identifier {data[4:8]!r}, not {FILE_IDENTIFIER!r}")
    end = header.segment_base_offset + header.segment_data_size
    if end > len(data) or header.flatbuffer_offset + header.flatbuffer_size > header.segment_base_offset:
        raise bad(f"truncated or corrupt: {len(data)} bytes, its header places the flatbuffer at "
                  f"{header.flatbuffer_offset}+{header.flatbuffer_size} and the segments at "
                  f"{header.segment_base_offset}+{header.segment_data_size}")
    try:
        version, segments, entries = _flat_tensor(data[:header.flatbuffer_offset + header.flatbuffer_size])
    except _CORRUPT as e:
        raise bad(f"its FlatTensor table is corrupt: {type(e).__name__} {e}") from e
    if version > _FLAT_TENSOR_VERSION:
        raise bad(f"FlatTensor version {version}, newer than this executorch reads ({_FLAT_TENSOR_VERSION})")
    for offset, size in segments:
        if offset + size > header.segment_data_size:
            raise bad(f"a segment at {offset}+{size} lies past the {header.segment_data_size} bytes of segment data")
    out = []
    for key, index, layout in entries:
        if index >= len(segments):
            raise bad(f"entry {key} names segment {index} of {len(segments)}")
        offset, size = segments[index]
        out.append(NamedEntry(key, header.segment_base_offset + offset, size, layout))
    return out


def _flat_tensor(buf: bytes) -> tuple[int, list[tuple[int, int]], list[tuple[str, int, Layout | None]]]:
    """The FlatTensor table at the root of ``buf``: its version, its segments (offset, size) and its
    named data (key, segment index, layout), read through the flatbuffers library's ``Table`` (an
    absent field is the schema's default)."""
    from flatbuffers import encode, packer
    from flatbuffers import number_types as fbn
    from flatbuffers.table import Table

    slot = _slots()

    def tables(table: Table, field: str) -> list[Table]:
        off = table.Offset(slot[field])
        if off == 0:
            return []
        start, count = table.Vector(off), table.VectorLen(off)
        if start + 4 * count > len(buf):
            raise ValueError(f"{field}: {count} tables past the end of the {len(buf)}-byte flatbuffer")
        return [Table(buf, table.Indirect(start + 4 * i)) for i in range(count)]

    def numbers(table: Table, field: str, flags) -> tuple[int, ...]:
        off = table.Offset(slot[field])
        if off == 0:
            return ()
        start, count = table.Vector(off), table.VectorLen(off)
        if start + flags.bytewidth * count > len(buf):
            raise ValueError(f"{field}: {count} numbers past the end of the {len(buf)}-byte flatbuffer")
        return tuple(table.Get(flags, start + flags.bytewidth * i) for i in range(count))

    def layout(table: Table) -> Layout | None:
        off = table.Offset(slot["NamedData.tensor_layout"])
        if off == 0:
            return None
        t = Table(buf, table.Indirect(table.Pos + off))
        return Layout(t.GetSlot(slot["TensorLayout.scalar_type"], 0, fbn.Int8Flags),
                      numbers(t, "TensorLayout.sizes", fbn.Int32Flags),
                      numbers(t, "TensorLayout.dim_order", fbn.Uint8Flags))

    root = Table(buf, encode.Get(packer.uoffset, buf, 0))
    version = root.GetSlot(slot["FlatTensor.version"], 0, fbn.Uint32Flags)
    segments = [(t.GetSlot(slot["DataSegment.offset"], 0, fbn.Uint64Flags),
                 t.GetSlot(slot["DataSegment.size"], 0, fbn.Uint64Flags))
                for t in tables(root, "FlatTensor.segments")]
    entries = []
    for t in tables(root, "FlatTensor.named_data"):
        key = t.Offset(slot["NamedData.key"])
        if key == 0:
            raise ValueError("a named entry without a key")
        entries.append((t.String(t.Pos + key).decode(), t.GetSlot(slot["NamedData.segment_index"], 0, fbn.Uint32Flags),
                        layout(t)))
    return version, segments, entries


@cache
def _slots() -> dict[str, int]:
    """The vtable slot of every field of the FlatTensor schema, by ``Table.field``: executorch's
    schema dataclasses list a table's fields in flat_tensor.fbs's order, and the n-th field of a
    flatbuffer table has slot 4 + 2n."""
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.flat_tensor_schema import DataSegment, FlatTensor, NamedData

    return {f"{cls.__name__}.{field.name}": 4 + 2 * n for cls in (FlatTensor, DataSegment, NamedData, TensorLayout)
            for n, field in enumerate(dataclasses.fields(cls))}


def _contiguous(layout: Layout) -> bool:
    """Its bytes are in row-major order: the dim order is a permutation of the dims in which those
    longer than 1 come in increasing order (executorch writes a ``[384, 1]`` tensor in dim order
    ``[1, 0]``: the same bytes)."""
    sizes, order = layout.sizes, layout.dim_order
    if min(sizes, default=0) < 0 or sorted(order) != list(range(len(sizes))):
        return False
    long = [d for d in order if sizes[d] != 1]
    return long == sorted(long)


def _metadata(path: Path, data: bytes) -> dict:
    try:
        meta = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaseModelError(f"{path}: its {META_KEY} entry is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BaseModelError(f"{path}: its {META_KEY} entry names format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                             f"not {FORMAT}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BaseModelError(f"{path}: format version {meta['format_version']} is newer than this loradeploy reads "
                             f"({FORMAT_VERSION})")
    return meta


def check_tensor_data(path: Path) -> str | None:
    """``verify``'s check of a ``.ptd``: its header and FlatTensor table read, every entry lies in
    the file, every tensor's bytes fit its shape, its metadata is loradeploy's."""
    read_tensor_data(path)
    return None
