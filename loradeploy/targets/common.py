"""What every target plugin shares: the interface it implements and small helpers. A target
never imports another target."""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..job import ExportJob

#: Tokenizer files copied next to an exported model so the artifact is self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "tokenizer.model", "sentencepiece.bpe.model", "merges.txt", "vocab.json")


class Target(ABC):
    """A runtime's export plugin: writes an artifact's files into a folder and returns the
    decisions it took (files, precision per tensor). Loading an artifact is the runtime
    session's job (``loradeploy/plugins/<rt>/``); the pair is registered in ``registry.py``."""

    @abstractmethod
    def export(self, job: ExportJob, out: Path, progress=None) -> dict: ...

    # A plugin whose artifacts can share one base file across adapters (``loradeploy.fleet``)
    # overrides these three; by default every artifact is exported whole.

    def shared_base(self, job: ExportJob) -> dict | None:
        """What the job's base file depends on besides the base and profile (JSON data: the
        fleet keys the shared file by it), or None when it cannot be shared."""
        return None

    def export_shared(self, job: ExportJob, signature: dict, out: Path, progress=None) -> dict:
        raise NotImplementedError(f"{type(self).__name__} exports no shared base")

    def export_on_shared(self, job: ExportJob, shared: Path, shared_decisions: dict, out: Path,
                         progress=None) -> dict:
        raise NotImplementedError(f"{type(self).__name__} exports no shared base")


def copy_tokenizer(base_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
            copied.append(name)
    return copied
