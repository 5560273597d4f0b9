"""The special tokens of a causal-LM artifact's tokenizer, stated for onnxruntime-genai.

onnxruntime-genai (0.18) tokenizes with onnxruntime-extensions. It creates its tokenizer with
``add_special_tokens`` off (``Tokenizer::Tokenizer`` in its ``src/models/model.cpp``, since its PR
#1442: a chat template already holds the BOS token), so ``og.Tokenizer(model).encode(text)`` adds
no BOS or EOS whatever the files say; ``tokenizer.update_options(add_special_tokens="true")`` turns
them on (measured: ``[818, 8217, …]`` without, ``[2, 818, 8217, …]`` with, for Gemma 3). Which
ones it then adds: ``add_bos_token`` / ``add_eos_token`` from ``tokenizer_config.json`` updated by
``tokenizer_module.json`` when they are there, else a text search of ``tokenizer.json``'s
``post_processor`` for the BOS and EOS token strings (an EOS in the *pair* template alone makes it
append EOS to every text), else per-class defaults. transformers ≥ 5 saves neither flag, so the
artifact states them in ``tokenizer_module.json``, which only onnxruntime-extensions reads: the
special tokens the model's own tokenizer (the one loradeploy and the reference use) adds.
"""

from __future__ import annotations

import json
from pathlib import Path

#: the file onnxruntime-extensions merges over tokenizer_config.json (transformers ignores it)
MODULE_FILE = "tokenizer_module.json"
#: a text whose tokens hold no special token of any tokenizer
PROBE = "Hello world"


def special_token_flags(tokenizer) -> dict[str, bool]:
    """Whether ``tokenizer`` (transformers) puts its BOS / EOS token around a text's own tokens."""
    ids = tokenizer(PROBE)["input_ids"]
    plain = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"add_bos_token": bos is not None and len(ids) > len(plain) and ids[0] == bos,
            "add_eos_token": eos is not None and len(ids) > len(plain) and ids[-1] == eos}


def write_special_tokens(folder: Path, tokenizer) -> dict[str, bool]:
    """``folder/tokenizer_module.json``: the special tokens ``tokenizer`` adds, for
    onnxruntime-genai's tokenizer once its special tokens are on; returns them."""
    flags = special_token_flags(tokenizer)
    (Path(folder) / MODULE_FILE).write_text(json.dumps(flags, indent=2) + "\n")
    return flags
