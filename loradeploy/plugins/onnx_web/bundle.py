"""The web files of a bundle, copied from the repository's ``web/`` package at export time (no CDN
at run time): onnxruntime-web's WebAssembly build, the tokenizer library's ES module,
``loradeploy.mjs`` and ``index.html``; ``web.json``, what ``loradeploy.mjs`` reads; the base's fingerprint
an adapter file names."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from . import BASE_TENSORS, FORMAT, FORMAT_VERSION, MODEL_FILE, WEB_CONFIG
from .node import ORT_DIST, TOKENIZERS_DIST, WEB_DIR, package_version, require_packages

ORT_DIR = "ort"
ORT_MODULE = "ort.wasm.min.mjs"  # onnxruntime-web with the WebAssembly backend only
ORT_RUNTIME = ("ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")  # what it loads
TOKENIZER_MODULE = "vendor/tokenizers.mjs"  # @huggingface/tokenizers, the pure-JS tokenizers
PAGE_FILES = ("loradeploy.mjs", "lm.mjs", "index.html")  # sources in web/src/


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over the base's weight files' sha256 (what an adapter file names as its base)."""
    from ...fsutil import file_sha256

    weights = [base_dir] if base_dir.is_file() else \
        sorted(base_dir.glob("*.safetensors")) or sorted(base_dir.glob("*.bin"))
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in weights).encode()).hexdigest()


def web_files() -> list[str]:
    """The copied files' paths in a bundle."""
    return [f"{ORT_DIR}/{name}" for name in (ORT_MODULE, *ORT_RUNTIME)] + [TOKENIZER_MODULE, *PAGE_FILES]


def write_web_files(out: Path) -> dict:
    """Copy the runtime, the tokenizer library and the page into ``out``; what was copied."""
    require_packages()
    (out / ORT_DIR).mkdir()
    for name in (ORT_MODULE, *ORT_RUNTIME):
        shutil.copyfile(ORT_DIST / name, out / ORT_DIR / name)
    (out / TOKENIZER_MODULE).parent.mkdir()
    shutil.copyfile(TOKENIZERS_DIST / "tokenizers.min.mjs", out / TOKENIZER_MODULE)
    for name in PAGE_FILES:
        shutil.copyfile(WEB_DIR / "src" / name, out / name)
    return {"onnxruntime-web": package_version("onnxruntime-web"),
            "@huggingface/tokenizers": package_version("@huggingface/tokenizers")}


def web_config(*, task: str, output: str, base_fingerprint: str, slots: dict[str, tuple[int, int]],
               travelling: dict[str, list[int]], adapters: dict[str, str], max_length: int, pad_token_id: int,
               labels: list[str] | None, examples: list[str]) -> dict:
    """``web.json``: slots are ``{module}.lora_A [in, rank]`` / ``{module}.lora_B [rank, out]``."""
    slot_inputs = {}
    for module, (n_in, n_out) in slots.items():
        slot_inputs[f"{module}.lora_A"] = {"role": "lora_A", "shape": [n_in, "rank"]}
        slot_inputs[f"{module}.lora_B"] = {"role": "lora_B", "shape": ["rank", n_out]}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "model": MODEL_FILE,
            "inputs": ["input_ids", "attention_mask"], "output": output, "base_fingerprint": base_fingerprint,
            "base_tensors": BASE_TENSORS, "slots": slot_inputs, "travelling": travelling, "adapters": adapters,
            "max_length": max_length, "pad_token_id": pad_token_id, "labels": labels, "examples": examples,
            "tokenizer": {"module": TOKENIZER_MODULE, "json": "tokenizer.json", "config": "tokenizer_config.json"},
            "ort": {"dir": f"{ORT_DIR}/", "module": ORT_MODULE, "runtime": list(ORT_RUNTIME)}}


def write_config(out: Path, config: dict) -> None:
    (out / WEB_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
