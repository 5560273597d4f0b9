"""A tiny randomly initialised BERT encoder (1 layer, hidden 32), saved as a Hugging Face folder
with a character-level WordPiece tokenizer, and PEFT LoRA classifier adapters for it with a rank
per module: for tests of encoder targets that do not need the real MiniLM (it lowers in seconds)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, FFN, MAX_POSITIONS = 32, 1, 2, 64, 256
VOCAB = 2048  # loradeploy's latency runs feed token ids 1000–1999 (loradeploy.timing)
#: each block's linear layers: name under ``bert.encoder.layer.N.`` → (in, out)
LINEARS = {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
           "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
           "intermediate.dense": (HIDDEN, FFN), "output.dense": (FFN, HIDDEN)}


def modules() -> list[str]:
    """Every linear layer of the blocks, as a classifier on this base names it."""
    return [f"bert.encoder.layer.{i}.{name}" for i in range(LAYERS) for name in LINEARS]


def tokenizer():
    """WordPiece over lower-case ASCII characters (a word is its characters), BERT's specials,
    unused entries up to :data:`VOCAB`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def build(folder: Path, seed: int = 0) -> Path:
    """``folder`` ← a tiny BERT encoder (no head; random weights, seeded) with its tokenizer."""
    import transformers

    tok = tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=FFN,
                                     max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(seed)
    transformers.BertModel(config, add_pooling_layer=True).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def peft_adapter(folder: Path, ranks: dict[str, int], seed: int = 1) -> Path:
    """A PEFT LoRA classifier (SEQ_CLS, 2 labels) adapting each module of ``ranks`` (names as
    :func:`modules`) at its rank, alpha 16, random A and B large enough to move the logits, and a
    trained head (``modules_to_save``)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, r in ranks.items():
        n_in, n_out = LINEARS[name.split(".", 4)[4]]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.3
    tensors["base_model.model.classifier.weight"] = torch.randn(2, HIDDEN, generator=g)
    tensors["base_model.model.classifier.bias"] = torch.randn(2, generator=g) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": max(ranks.values()), "lora_alpha": 16,
        "rank_pattern": ranks, "alpha_pattern": {}, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "modules_to_save": ["classifier"]}))
    return folder
