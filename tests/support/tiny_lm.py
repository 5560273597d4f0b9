"""Tiny randomly initialised causal LMs of the families the ONNX decoder path exports (Llama,
Qwen2, Qwen3, Gemma 3), each saved as a Hugging Face folder with a small byte-level BPE
tokenizer, and PEFT LoRA adapters for them with a different rank per module."""

from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, HEAD_DIM = 64, 4, 2, 2, 128, 16
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tokenizer():
    """A byte-level BPE tokenizer of 256 bytes + 3 specials (no merges): ids 0..2 are
    <pad>, <eos>, <bos> as in Gemma."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def config(family: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6,
                  max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False), transformers.LlamaForCausalLM
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False), transformers.Qwen2ForCausalLM
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=HEAD_DIM, tie_word_embeddings=True), \
            transformers.Qwen3ForCausalLM
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                             sliding_window=8, layer_types=["sliding_attention", "full_attention"]), \
            transformers.Gemma3ForCausalLM
    raise ValueError(family)


def build(folder: Path, family: str, seed: int = 0) -> Path:
    """``folder`` ← a tiny ``family`` model (random weights, seeded) with its tokenizer."""
    tok = tokenizer()
    cfg, cls = config(family, len(tok))
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(-0.2, 0.2) if family == "gemma3" else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def peft_adapter(folder: Path, base: Path, seed: int = 1, modules=PROJECTIONS, layers=range(LAYERS),
                 norms: bool = False) -> Path:
    """A PEFT LoRA folder on ``base`` for ``modules`` of ``layers``, rank 2..8 varying per module
    (``rank_pattern``), alpha 16, random A and B (non-zero: the adapter changes the outputs).
    ``norms``: every RMSNorm weight of the base trained too (the base's value plus N(0, 0.1)), saved
    as PEFT saves ``modules_to_save``."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((base / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (cfg["hidden_size"], q_out), "self_attn.k_proj": (cfg["hidden_size"], kv_out),
              "self_attn.v_proj": (cfg["hidden_size"], kv_out), "self_attn.o_proj": (q_out, cfg["hidden_size"]),
              "mlp.gate_proj": (cfg["hidden_size"], cfg["intermediate_size"]),
              "mlp.up_proj": (cfg["hidden_size"], cfg["intermediate_size"]),
              "mlp.down_proj": (cfg["intermediate_size"], cfg["hidden_size"])}
    g = torch.Generator().manual_seed(seed)
    tensors, ranks = {}, {}
    for i, layer in enumerate(layers):
        for j, mod in enumerate(modules):
            r = 2 + (i * len(modules) + j) % 7
            in_f, out_f = shapes[mod]
            name = f"model.layers.{layer}.{mod}"
            ranks[name] = r
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.2
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
    saved = []
    if norms:
        for key, value in sorted(load_file(str(base / "model.safetensors")).items()):
            if key.endswith("norm.weight"):
                tensors[f"base_model.model.{key}"] = value + torch.randn(value.shape, generator=g) * 0.1
                saved.append(key.removesuffix(".weight"))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "rank_pattern": ranks,
        "alpha_pattern": {}, "layers_to_transform": list(layers), "target_modules": sorted({m.split(".")[-1] for m in modules}), "lora_dropout": 0.0,
        "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": str(base),
        "modules_to_save": saved or None}))
    return folder
