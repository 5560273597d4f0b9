"""Tensors in ExecuTorch's tensor-data format (``.ptd``, the FlatTensor file an app opens with the
runtime's named-data-map API), written and read with executorch's own serializer
(``NamedDataStore`` + ``FlatTensorSerializer``). Every tensor is a named entry keyed by its method
input (``<module>.lora_A`` …); one more entry, :data:`META_KEY`, holds JSON metadata (the
format, the base's fingerprint, the adapter's name) as plain bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import BaseModelError
from . import FORMAT, FORMAT_VERSION, META_KEY

TENSOR_ALIGNMENT = 16


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


def read_tensor_data(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of a ``.ptd`` written by :func:`write_tensor_data`; a file that is
    not one is a :class:`BaseModelError` naming it."""
    from executorch.exir._serialize._cord import Cord
    from executorch.exir.scalar_type import ScalarType
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    try:
        payload = FlatTensorSerializer().deserialize(Cord(Path(path).read_bytes()))
    except Exception as e:  # noqa: BLE001  the serializer's complaint is the file's problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(f"{path}: not an ExecuTorch tensor-data file ({first})") from e
    tensors, meta = {}, None
    for key, entry in payload.named_data.items():
        data = bytes(payload.buffers[entry.buffer_index])
        if key == META_KEY:
            meta = _metadata(path, data)
            continue
        layout = entry.tensor_layout
        if layout is None or layout.scalar_type != ScalarType.FLOAT:
            raise BaseModelError(f"{path}: entry {key} is not a float32 tensor")
        count = int(np.prod(layout.sizes)) if layout.sizes else 1
        if len(data) < 4 * count:
            raise BaseModelError(f"{path}: entry {key} holds {len(data)} bytes, its shape {list(layout.sizes)} needs "
                                 f"{4 * count}")
        tensors[key] = np.frombuffer(data[:4 * count], dtype=np.float32).reshape(layout.sizes).copy()
    if meta is None:
        raise BaseModelError(f"{path}: no {META_KEY} entry (not written by loradeploy's ExecuTorch target)")
    return tensors, meta


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
    """``verify``'s check of a ``.ptd``: it deserializes, every entry's bytes fit its shape."""
    read_tensor_data(path)
    return None
