"""The llama.cpp reference unit's model: a fixed tiny llama (seeded weights, Q8_0 matrices, a
small SentencePiece-style vocabulary), written once into the cache folder. Latency is compared as
a ratio to prompt processing on it (see ``LlamaSession.reference_unit``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _gguf():
    import gguf

    return gguf


#: the reference unit's model: a fixed tiny llama (seeded weights, Q8_0 matrices), bump the
#: version when its recipe changes (its file name carries it)
REFERENCE_MODEL = {"version": 1, "hidden": 256, "heads": 4, "layers": 2, "ffn": 768, "vocab": 512, "tokens": 64}


def _write_reference_model(path: Path) -> None:
    gguf = _gguf()
    r = REFERENCE_MODEL
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4 * r["tokens"])
    w.add_embedding_length(r["hidden"])
    w.add_block_count(r["layers"])
    w.add_feed_forward_length(r["ffn"])
    w.add_head_count(r["heads"])
    w.add_head_count_kv(r["heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(r["hidden"] // r["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(r["vocab"] - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (r["vocab"] - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    h, f, v = r["hidden"], r["ffn"], r["vocab"]

    def matrix(name: str, rows: int, cols: int) -> None:
        arr = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", v, h)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    matrix("output.weight", v, h)
    for i in range(r["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{name}.weight", h, h)
        matrix(f"blk.{i}.ffn_gate.weight", f, h)
        matrix(f"blk.{i}.ffn_up.weight", f, h)
        matrix(f"blk.{i}.ffn_down.weight", h, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_model() -> Path:
    """The reference unit's GGUF in the cache folder (written once, then reused)."""
    from ...fsutil import cache_dir

    path = cache_dir() / f"reference-unit-v{REFERENCE_MODEL['version']}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        _write_reference_model(tmp)
        os.replace(tmp, path)
    return path
