"""ggufheader: a GGUF header read without decoding its metadata arrays gives what gguf.GGUFReader
gives (tensors, offsets, scalars), and names a file that ends inside its header or its data."""

import gguf
import numpy as np
import pytest

from loradeploy.base import resolve_base
from loradeploy.errors import BaseModelError
from loradeploy.plugins.llama_cpp.header import read_header


def _reader_view(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in r.tensors}
    return r, tensors


def test_the_gemma_base_header_equals_gguf_readers():
    path = resolve_base("gemma3-270m")
    header = read_header(path)
    reader, tensors = _reader_view(path)
    assert {n: (t.dims, t.ggml_type, header.data_start + t.offset) for n, t in header.tensors.items()} == tensors
    assert header.data_start == reader.data_offset and header.architecture == "gemma3"
    for key in ("gemma3.block_count", "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
                "gemma3.context_length", "tokenizer.ggml.model"):
        assert header.metadata[key] == reader.fields[key].contents(), key
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped, not decoded
    assert header.extent_problem() is None


def _small_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_array("some.array", ["a", "bc", "def"])
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.arange(64 * 4, dtype=np.float32).reshape(4, 64))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 4), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_small_file_and_its_truncations(tmp_path):
    path = _small_gguf(tmp_path / "a.gguf")
    header = read_header(path)
    _, tensors = _reader_view(path)
    assert {n: (t.dims, t.ggml_type, header.data_start + t.offset) for n, t in header.tensors.items()} == tensors
    assert header.metadata == {"general.architecture": "llama", "general.type": "adapter", "adapter.lora.alpha": 16.0}
    assert header.extent_problem() is None
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-10])  # inside the last tensor's data
    problem = read_header(cut).extent_problem()
    assert problem is not None and "blk.0.attn_q.weight.lora_b" in problem and "truncated" in problem
    cut.write_bytes(data[:header.data_start - 40])  # inside the tensor infos
    with pytest.raises(BaseModelError, match="truncated GGUF header"):
        read_header(cut)
    cut.write_bytes(b"GGML" + data[4:])
    with pytest.raises(BaseModelError, match="bad magic"):
        read_header(cut)
