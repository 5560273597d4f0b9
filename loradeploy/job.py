"""Job assembly shared by the verbs that export, quantize and validate: which adapters (read and
pruned exactly), on which base (loaded once by the one base loader), for which target profile.
A job is a value: a stage that changes something returns a new job (``dataclasses.replace``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import ReadOptions, read_adapter
from .base import base_task, load_torch_model, resolve_base
from .errors import BaseModelError, LoradeployError
from .ir import Method, Task
from .manifest import ADAPTER_NAME_RULE, is_adapter_name
from .merge import check_fits
from .prune import prune
from .slots import DEFAULT as DEFAULT_SLOTS

if TYPE_CHECKING:
    import torch

    from .ir import AdapterSet
    from .prune import PruneReport
    from .quant.plan import Plan, QuantizedAdapter
    from .profile import TargetProfile


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as the user names it: ``NAME=PATH`` or ``PATH``."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """``NAME=PATH`` or ``PATH`` (the name is then the folder or file stem)."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/")).stem
        if not is_adapter_name(name):
            raise LoradeployError(f"adapter name {name!r}: {ADAPTER_NAME_RULE}")
        return cls(name, Path(path))


@dataclass(frozen=True)
class AdapterInputs:
    """The adapters of a job and how to read them."""

    specs: tuple[AdapterSpec, ...] = field(metadata={"help": "adapters in order (names must differ)"})
    method: Method | None = field(default=None, metadata={"help": "format; detected when None"})
    options: ReadOptions = field(default_factory=ReadOptions, metadata={"help": "what the checkpoint may lack"})

    @classmethod
    def of(cls, adapters, method: Method | None = None, options: ReadOptions | None = None) -> "AdapterInputs":
        """From ``{name: path}`` or a list of :class:`AdapterSpec`."""
        specs = [AdapterSpec(n, Path(p)) for n, p in adapters.items()] if isinstance(adapters, dict) else adapters
        return cls(tuple(specs), method, options or ReadOptions())

    def __post_init__(self):
        if not self.specs:
            raise LoradeployError("give at least one adapter")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise LoradeployError(f"adapter names must differ (got {', '.join(names)}); name them NAME=PATH")


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of a job: as trained (the reference) and pruned (what ships), and — once a
    precision plan is applied — its stored form."""

    name: str
    source: Path
    original: "AdapterSet"
    pruned: "AdapterSet"
    prune_report: "PruneReport"
    quantized: "QuantizedAdapter | None" = None


@dataclass(frozen=True)
class ExportJob:
    base_spec: str
    base_dir: Path
    task: Task
    num_labels: int | None
    adapters: tuple[AdapterEntry, ...]
    profile: "TargetProfile"
    mode: str
    base_model: "torch.nn.Module"  # fp32, eval mode, loaded once
    plan: "Plan | None" = None  # the precision plan applied to the adapters (swappable)
    slots: str = DEFAULT_SLOTS  # swappable: which modules and norms are inputs (loradeploy.slots)


def load_entries(inputs: AdapterInputs) -> tuple[AdapterEntry, ...]:
    """Read and prune every adapter; they must share one task and label count."""
    entries = []
    for spec in inputs.specs:
        original = read_adapter(spec.path, inputs.method, inputs.options)
        pruned, report = prune(original)
        entries.append(AdapterEntry(spec.name, spec.path, original, pruned, report))
    tasks = {(e.original.task, e.original.num_labels) for e in entries}
    if len(tasks) > 1:
        raise LoradeployError("the adapters are for different tasks or label counts: "
                              + ", ".join(f"{e.name}: {e.original.task.value}/{e.original.num_labels}" for e in entries))
    return tuple(entries)


def load_base_for(base: str, entries: tuple[AdapterEntry, ...]):
    """The base (the one loader) for these adapters: (folder or file, task, labels, fp32 model),
    with every adapter checked to fit it."""
    base_dir = resolve_base(base)
    task = base_task(base_dir) or entries[0].original.task
    num_labels = entries[0].original.num_labels if task is Task.SEQUENCE_CLASSIFICATION else None
    base_model = load_torch_model(base_dir, task, num_labels)
    check_adapters_fit(base, base_model, entries)
    return base_dir, task, num_labels, base_model


_TASK_WORDS = {Task.CAUSAL_LM: "a causal LM", Task.SEQUENCE_CLASSIFICATION: "a classifier",
               Task.FEATURE_EXTRACTION: "an encoder"}


def check_adapters_fit(base: str, model: "torch.nn.Module", entries: tuple[AdapterEntry, ...]) -> None:
    """Every adapter fits ``model`` (the base given as ``base``); else an error naming both in
    words: the adapter's method and the base it was trained on (or its task), the base as given
    and its model type — not where an alias is installed, nor a head class."""
    for e in entries:
        try:
            check_fits(model, e.original)
        except BaseModelError as err:
            a = e.original
            trained = a.base_model_hint or _TASK_WORDS[a.task]
            family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
            raise BaseModelError(f"{e.source}: a {a.method.value} adapter for {trained} does not fit base {base} "
                                 f"(a {family} model): {err}") from err
