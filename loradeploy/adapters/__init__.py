"""Readers, one per training method, behind one entry point :func:`read_adapter`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..ir import AdapterSet, Method, Task
from . import blora, increlora, peft, sora
from .checkpoint import Checkpoint, ReadOptions, open_checkpoint
from .detect import detect

__all__ = ["READERS", "ReadOptions", "read_adapter", "Method"]

#: The reader of each method; every reader maps a loaded checkpoint to the IR.
READERS: dict[Method, Callable[[Checkpoint, ReadOptions], AdapterSet]] = {
    Method.SORA: sora.read,
    Method.INCRELORA: increlora.read,
    Method.BLORA: blora.read,
    Method.PEFT_LORA: peft.read,
    Method.PEFT_ADALORA: peft.read,
}


def read_adapter(path: Path | str, method: Method | None = None,
                 options: ReadOptions | None = None) -> AdapterSet:
    """Read the adapter at ``path`` (a file or a checkpoint folder) into an :class:`AdapterSet`.

    ``method`` overrides detection. Raises a :class:`~loradeploy.errors.LoradeployError`
    naming the file on unreadable, unsafe, inconsistent or empty input.
    """
    ckpt = open_checkpoint(Path(path))
    method = method or detect(ckpt)
    if method in (Method.BLORA, Method.PEFT_LORA, Method.PEFT_ADALORA) and "adapter_config.json" not in ckpt.configs:
        from ..errors import AdapterFormatError

        raise AdapterFormatError(ckpt.weights, f"{method.value} adapters need adapter_config.json beside them")
    adapter = READERS[method](ckpt, options or ReadOptions())
    if adapter.task is Task.SEQUENCE_CLASSIFICATION:
        from .common import label_names

        adapter.label_names, note = label_names(ckpt, adapter.num_labels)
        if note:
            adapter.notes.append(note)
    return adapter
