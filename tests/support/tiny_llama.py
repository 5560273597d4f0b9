"""A tiny llama-architecture model written both as a transformers folder and as a GGUF file
(random weights; vocabulary and tokenizer metadata borrowed from the Gemma GGUF), so that the
q/k row permutation of llama-family conversions can be checked end to end in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF half-split rotary → GGUF interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build(folder: Path, gemma_gguf: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``folder/hf`` (LlamaForCausalLM) and ``folder/tiny-llama.gguf``; return both."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(gemma_gguf))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6,
                         max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    hf = folder / "hf"
    model.save_pretrained(hf)

    path = folder / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, t in model.state_dict().items():
        arr = t.float().numpy()
        if key.endswith("q_proj.weight"):
            arr = _permute(arr, HEADS, HEADS)
        elif key.endswith("k_proj.weight"):
            arr = _permute(arr, HEADS, KV_HEADS)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, path


def sora_adapter(folder: Path, seed: int = 1) -> Path:
    """A SoRA adapter on every layer's q_proj and k_proj (some gates zero)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    kv_out = HIDDEN // HEADS * KV_HEADS
    for layer in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("k_proj", kv_out)):
            p = f"model.layers.{layer}.self_attn.{proj}"
            sd[f"{p}.lora.lora_A"] = torch.randn(4, HIDDEN, generator=g) * 0.3
            sd[f"{p}.lora.lora_B"] = torch.randn(out, 4, generator=g) * 0.3
            sd[f"{p}.lora.gate"] = torch.tensor([[1.0, 0.0, 0.7, -0.5]])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "lora_config.json").write_text('{"lora_r": 4, "lora_alpha": 8}')
    return folder
