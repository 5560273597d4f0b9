"""Locating a checkpoint on disk: the tensor file, the config files beside it, provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterFileError
from ..ir import SourceFile
from ..fsutil import sha256_file
from ..tensorio import load_json, load_tensors

#: Tensor files looked for in a checkpoint folder, in order of preference (safetensors first).
WEIGHT_FILES: tuple[str, ...] = (
    "adapter_model.safetensors",  # PEFT, B-LoRA fork
    "model.safetensors",  # SoRA with transformers >= 4.35
    "adapter_model.bin",  # PEFT legacy
    "pytorch_model.bin",  # SoRA (older transformers), IncreLoRA full model
)

#: Config files a reader may consult, relative to the checkpoint folder.
CONFIG_FILES: tuple[str, ...] = (
    "adapter_config.json",  # PEFT, B-LoRA fork
    "config.json",  # IncreLoRA (model config with lora_* fields)
    "lora_config.json",  # SoRA
    "config/lora_config.json",  # SoRA, as in its repository
    "../rank_pattern.json",  # IncreLoRA, one level up
    "rank_pattern.json",
)


@dataclass
class ReadOptions:
    """What the user tells a reader that the checkpoint itself may not hold."""

    lora_alpha: float | None = field(default=None, metadata={"help": "override lora_alpha"})
    lora_r: int | None = field(default=None, metadata={"help": "SoRA: lora_r if no config"})
    head: Path | None = field(default=None, metadata={"help": "file with a classifier head"})


@dataclass
class Checkpoint:
    """A tensor file loaded into memory, with the JSON configs found beside it."""

    weights: Path
    tensors: dict[str, torch.Tensor]
    configs: dict[str, Path]

    @property
    def folder(self) -> Path:
        return self.weights.parent

    def config(self, name: str) -> dict | None:
        path = self.configs.get(name)
        return load_json(path) if path else None

    def sources(self, *extra: Path) -> list[SourceFile]:
        files = [self.weights, *self.configs.values(), *extra]
        return [SourceFile(str(p), sha256_file(p), p.stat().st_size) for p in files]


def open_checkpoint(path: Path) -> Checkpoint:
    """Load ``path`` (a tensor file, or a folder holding one of :data:`WEIGHT_FILES`)."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(path, "no such file or directory")
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise AdapterFileError(
                path, f"no adapter weights in this folder (looked for {', '.join(WEIGHT_FILES)})"
            )
        weights = found[0]
    else:
        weights = path
    configs = {
        name: (weights.parent / name).resolve()
        for name in CONFIG_FILES
        if (weights.parent / name).is_file()
    }
    return Checkpoint(weights=weights, tensors=load_tensors(weights), configs=configs)
