"""Helpers shared by the per-method readers."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import AdapterFormatError
from ..ir import HEAD_PREFIXES, IRError
from .checkpoint import Checkpoint, ReadOptions
from ..tensorio import load_tensors


@contextlib.contextmanager
def blame(path: Path):
    """Re-raise IR consistency errors as format errors naming ``path``."""
    try:
        yield
    except IRError as e:
        raise AdapterFormatError(path, str(e)) from e


def group_by_module(tensors: dict[str, torch.Tensor], pattern: re.Pattern) -> dict[str, dict]:
    """Group keys matched by ``pattern`` (groups ``module`` and ``role``) per module path."""
    groups: dict[str, dict] = defaultdict(dict)
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            groups[m["module"]][m["role"]] = t
    return dict(groups)


def require(path: Path, module: str, parts: dict, roles: tuple[str, ...]) -> None:
    missing = [r for r in roles if r not in parts]
    if missing:
        raise AdapterFormatError(path, f"module {module}: missing {', '.join(missing)}")


def head_tensors(tensors: dict[str, torch.Tensor], strip: str = "") -> dict[str, torch.Tensor]:
    """Task-head tensors (classifier etc.) among ``tensors``, keys without ``strip``."""
    out = {}
    for key, t in tensors.items():
        name = key[len(strip):] if strip and key.startswith(strip) else key
        if name.startswith(HEAD_PREFIXES):
            out[name] = t
    return out


def load_head(ckpt: Checkpoint, options: ReadOptions) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """A head the user names (``--head``) or a ``head.safetensors`` beside the checkpoint."""
    path = options.head or (ckpt.folder / "head.safetensors")
    if options.head is None and not path.is_file():
        return {}, []
    tensors = load_tensors(path)
    head = head_tensors(tensors)
    if not head:
        raise AdapterFormatError(
            path, f"no head tensors (names starting with {', '.join(HEAD_PREFIXES)})"
        )
    return head, [path]


def positive_number(path: Path, name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise AdapterFormatError(path, f"{name} must be a positive number, got {value!r}")
    return v


def rank_of(path: Path, module: str, lora_A: torch.Tensor) -> int:
    """The rank of a module: rows of its ``lora_A [r, in]``."""
    if lora_A.dim() != 2 or lora_A.shape[0] == 0:
        raise AdapterFormatError(path, f"module {module}: lora_A must be a matrix [r,in] with r > 0, "
                                       f"got shape {list(lora_A.shape)}")
    return int(lora_A.shape[0])


def positive_integer(path: Path, name: str, value) -> int:
    """A rank from a config file: a positive whole number (``8`` or ``8.0``, not ``true``)."""
    if isinstance(value, bool) or value is None or positive_number(path, name, value) % 1:
        raise AdapterFormatError(path, f"{name} must be a positive integer, got {value!r}")
    return int(float(value))



#: configs beside a checkpoint that may name its classes (``id2label``), in order of preference
LABEL_CONFIGS = ("adapter_config.json", "config.json", "lora_config.json", "config/lora_config.json")
_DEFAULT_LABEL = re.compile(r"LABEL_(\d+)")


def names_from_id2label(id2label, num_labels: int | None) -> tuple[tuple[str, ...] | None, str | None]:
    """Class names by label id from a config's ``id2label`` naming ids 0…n-1, or None with the
    reason (None too for transformers' placeholder names ``LABEL_i``, which name nothing)."""
    if not isinstance(id2label, dict) or not id2label:
        return None, None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None, f"id2label keys are not label ids ({next(iter(id2label))!r})"
    names = tuple(by_id.get(i, "") for i in range(len(by_id)))
    if all((m := _DEFAULT_LABEL.fullmatch(n)) and int(m[1]) == i for i, n in enumerate(names)):
        return None, None
    if "" in names or (num_labels is not None and len(names) != num_labels):
        return None, f"id2label names {len(by_id)} classes (ids {sorted(by_id)}), the head has {num_labels}"
    return names, None


def label_names(ckpt: Checkpoint, num_labels: int | None) -> tuple[tuple[str, ...] | None, str | None]:
    """The class names of a classifier checkpoint from the first config beside it whose
    ``id2label`` names them, and a note when a config's names do not fit the head."""
    for name in LABEL_CONFIGS:
        names, problem = names_from_id2label((ckpt.config(name) or {}).get("id2label"), num_labels)
        if problem:
            return None, f"{name}: {problem}; class names not kept"
        if names:
            return names, None
    return None, None
