"""Adapter files in ExecuTorch's tensor-data format: what write_tensor_data writes (executorch's
serializer), read_tensor_data reads as executorch's own deserializer does (names, shapes, dim
orders, values, metadata); a truncated or corrupt file is refused in one line naming it, whatever
byte of its FlatTensor table is changed."""

import json

import numpy as np
import pytest

from loradeploy.errors import BaseModelError
from loradeploy.plugins.executorch import META_KEY

# shapes an adapter file holds: rank-1 factors (executorch writes a transposed [384, 1] in dim order
# [1, 0]), a 1-D travelling tensor, a head; zeros in the first segment, whose offset is the default
SHAPES = {"layer.0.q.lora_A": (384, 1), "layer.0.q.lora_B": (1, 384), "layer.1.v.lora_A": (384, 3),
          "layer.1.v.lora_B": (3, 384), "norm.weight": (384,), "classifier.weight": (2, 384)}
FIELDS = {"adapter": "sora", "base_fingerprint": "ab" * 32, "rank_bound": 16}


@pytest.fixture
def written(tmp_path):
    from loradeploy.plugins.executorch.tensor_data import write_tensor_data

    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["layer.0.q.lora_A"] = np.zeros((1, 384), np.float32).T  # a transposed view, as the exporter's A factors
    path = tmp_path / "sora.ptd"
    write_tensor_data(tensors, path, FIELDS)
    return path, tensors


def _executorch_reads(path):
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(Cord(path.read_bytes()))
    return {k: (e.tensor_layout, bytes(payload.buffers[e.buffer_index])) for k, e in payload.named_data.items()}


def test_the_reader_and_executorchs_deserializer_agree(written):
    from loradeploy.plugins.executorch.tensor_data import named_entries, read_tensor_data

    path, tensors = written
    got, meta = read_tensor_data(path)
    theirs = _executorch_reads(path)
    assert set(theirs) == set(got) | {META_KEY} and set(got) == set(SHAPES)
    assert meta == json.loads(theirs[META_KEY][1]) == {"format": "loradeploy-executorch", "format_version": 1, **FIELDS}
    assert theirs[META_KEY][0] is None
    ours = {e.key: e for e in named_entries(path, path.read_bytes())}
    assert ours["layer.0.q.lora_A"].layout.dim_order == (1, 0)  # the case the dim-order check lets through
    for key, (layout, data) in theirs.items():
        if key == META_KEY:
            continue
        assert got[key].shape == tuple(layout.sizes) == SHAPES[key]
        assert ours[key].layout == (int(layout.scalar_type), tuple(layout.sizes), tuple(layout.dim_order))
        assert got[key].tobytes() == data[:got[key].nbytes] == tensors[key].tobytes()
        assert got[key].flags.writeable


@pytest.mark.parametrize("cut", ["identifier", "header", "flatbuffer", "segments", "last byte"])
def test_a_truncated_file_is_refused_in_one_line(written, cut):
    from loradeploy.plugins.executorch.tensor_data import named_entries, read_tensor_data

    path, _ = written
    data = path.read_bytes()
    flat_end = max(e.start for e in named_entries(path, data) if e.key != META_KEY)
    keep = {"identifier": 6, "header": 30, "flatbuffer": 200, "segments": flat_end, "last byte": len(data) - 1}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(BaseModelError) as e:
        read_tensor_data(path)
    assert str(e.value).startswith(f"{path}: not an ExecuTorch tensor-data file (") and "\n" not in str(e.value)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    from loradeploy.plugins.executorch.tensor_data import read_tensor_data

    with pytest.raises(BaseModelError, match=r"gone.ptd: cannot read it \(No such file"):
        read_tensor_data(tmp_path / "gone.ptd")


def test_every_flipped_byte_of_the_flatbuffer_is_refused_or_read(written):
    """A byte flipped anywhere in the header and FlatTensor table: the reader refuses the file in
    one line naming it, or reads it (a flipped key letter, padding) — it never fails otherwise."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader

    from loradeploy.plugins.executorch.tensor_data import read_tensor_data

    path, _ = written
    data = path.read_bytes()
    header = FlatTensorHeader.from_bytes(data[8:])
    refused = 0
    for i in range(header.flatbuffer_offset + header.flatbuffer_size):
        changed = bytearray(data)
        changed[i] ^= 0xFF
        path.write_bytes(changed)
        try:
            read_tensor_data(path)
        except BaseModelError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), (i, str(e))
            refused += 1
    assert refused > header.flatbuffer_size // 4  # offsets, sizes, vtables: most of the table matters


def test_an_entry_not_in_row_major_order_is_refused(tmp_path):
    import torch
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize.data_serializer import DataPayload
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    from loradeploy.plugins.executorch.tensor_data import read_tensor_data

    store = NamedDataStore()
    store.add_named_data("w", torch.arange(6, dtype=torch.float32).reshape(2, 3).t().contiguous(), external_tag="a")
    meta = {"format": "loradeploy-executorch", "format_version": 1, **FIELDS}
    store.add_named_data(META_KEY, json.dumps(meta).encode(), external_tag="a")
    out = store.get_named_data_store_output()
    entries = out.external_data["a"]
    layout = entries["w"].tensor_layout
    entries["w"].tensor_layout = TensorLayout(layout.scalar_type, [2, 3], [1, 0])  # the same bytes, column-major
    path = tmp_path / "columns.ptd"
    with open(path, "wb") as f:
        FlatTensorSerializer().serialize(DataPayload(buffers=out.buffers, named_data=entries)).write_to_file(f)
    assert _executorch_reads(path)["w"][0].dim_order == [1, 0]
    with pytest.raises(BaseModelError, match=r"columns.ptd: entry w has shape \[2, 3\] in dim order \[1, 0\], "
                                             "not a contiguous one"):
        read_tensor_data(path)
