"""What every target plugin shares: the export job it is given, the runner it returns, and
small helpers. A target never imports another target."""

from __future__ import annotations

import importlib
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # the runtime side (latency worker) must not pull in PyTorch
    import torch

    from ..ir import AdapterSet, Task
    from ..prune import PruneReport
    from ..quant.plan import QuantizedAdapter
    from .profile import TargetProfile

#: Tokenizer files copied next to an exported model so the artifact is self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "tokenizer.model", "sentencepiece.bpe.model", "merges.txt", "vocab.json")


@dataclass
class AdapterEntry:
    """One adapter of an export: as trained (the reference) and pruned (what ships)."""

    name: str
    source: Path
    original: AdapterSet
    pruned: AdapterSet
    prune_report: PruneReport
    quantized: "QuantizedAdapter | None" = None  # the precision plan applied (swappable exports)


@dataclass
class ExportJob:
    base_spec: str
    base_dir: Path
    task: Task
    num_labels: int | None
    adapters: list[AdapterEntry]
    profile: TargetProfile
    mode: str
    base_model: "torch.nn.Module"  # fp32, eval mode, loaded once by the export verb
    decisions: dict = field(default_factory=dict)


class Runner(ABC):
    """An artifact loaded in its runtime: the base once, adapters switchable per call."""

    adapters: tuple[str, ...] = ()

    @abstractmethod
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, adapter: str | None = None) -> np.ndarray:
        """Outputs (logits or embeddings) for one batch, with ``adapter`` active (None: base)."""


class Target(ABC):
    """A runtime plugin: ``export`` writes the artifact's files into a folder and returns the
    decisions it took (files, precision per tensor); ``open`` loads an artifact."""

    runtime: str = ""
    distribution: str = ""  # the runtime's Python distribution: its version goes into the latency fingerprint
    adapter_suffix: str = ""  # file name ending of one adapter in a swappable artifact

    @abstractmethod
    def export(self, job: ExportJob, out: Path) -> dict: ...

    @abstractmethod
    def open(self, artifact: Path, manifest: dict, threads: int = 0) -> Runner: ...

    @abstractmethod
    def reference_unit(self, threads: int = 0) -> Callable[[], float]:
        """A fixed unit of work in this runtime, independent of any artifact (same weights on
        every machine), timed in ms per call: latency is compared as a ratio to it, measured
        interleaved in the same process, so load from other jobs cancels out."""

    def open_base(self, base: Path, threads: int = 0) -> Runner | None:
        """The base alone in this runtime, when the base is itself a runtime file (GGUF)."""
        return None


#: runtime → "module:Class"; imported only when used, so a target's runtime is optional.
TARGETS: dict[str, str] = {
    "onnxruntime": "loradeploy.targets.onnx:OnnxTarget",
    "llama.cpp": "loradeploy.targets.gguf:GgufTarget",
    "bitsandbytes": "loradeploy.targets.bnb:BnbTarget",
}


def get_target(runtime: str) -> Target:
    from ..errors import LoradeployError

    if runtime not in TARGETS:
        raise LoradeployError(f"runtime {runtime!r} has no export target yet (available: {', '.join(TARGETS)})")
    module, cls = TARGETS[runtime].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise LoradeployError(f"target {runtime} needs {e.name}: pip install 'loradeploy[all]'") from e


def copy_tokenizer(base_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
            copied.append(name)
    return copied
