"""The table of runtimes, as data. Each runtime is one plugin folder, ``loradeploy/plugins/<rt>/``
(its exporter, its session, its LoRA storage formats, its options), whose ``__init__`` declares
its :class:`RuntimeSpec` as ``SPEC`` and imports nothing but this module and ``kinds``. Nothing
else names a runtime or branches on one: it asks the spec, and the spec names the plugin's
modules as strings that are imported only when used.

Built-in runtimes are listed in :data:`PLUGINS`; a runtime from another distribution registers
through the entry-point group ``loradeploy.plugins`` (name = runtime name, value = the module whose
``SPEC`` it is, or ``module:attribute``) — see docs/architecture.md, "Adding a runtime".
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from .errors import LoradeployError


#: built-in runtimes: name (as profiles and manifests write it) → the module declaring its ``SPEC``
PLUGINS: dict[str, str] = {
    "onnxruntime": "loradeploy.plugins.onnxruntime",
    "llama.cpp": "loradeploy.plugins.llama_cpp",
    "bitsandbytes": "loradeploy.plugins.bitsandbytes",
    "onnx-web": "loradeploy.plugins.onnx_web",
    "executorch": "loradeploy.plugins.executorch",
}
#: the entry-point group through which other distributions add runtimes
ENTRY_POINT_GROUP = "loradeploy.plugins"


@dataclass(frozen=True)
class LoraStorage:
    """How a runtime stores an adapter's LoRA tensors, for the precision plans: every format it
    reads and the layout the quantizers work on (rows = the runtime's quantization grouping;
    ``A`` is always ``[r, in]``)."""

    ladder: tuple[str, ...] = field(metadata={"help": "formats, highest precision first (the order plans lower them in)"})
    accepted: tuple[str, ...] = field(metadata={"help": "formats a plan file may name (the ladder + equal-size variants)"})
    by_bits: dict[int, str] = field(metadata={"help": "nominal bit width → format (uniform plans, B-LoRA hints)"})
    folds_scale: bool = field(metadata={"help": "scale and rank gates folded into B (else kept in the adapter's config)"})
    b_rank_major: bool = field(metadata={"help": "B stored as (s·B)ᵀ [r, out] (rows per rank), else [out, r]"})
    activations: dict[str, str] = field(default_factory=dict, metadata={
        "help": "weight format → how the runtime rounds that product's input before multiplying "
                "(quant.formats.round_activations: 'f16', 'q8_0'); a format not named: used as is"})

    def __post_init__(self):
        if not self.ladder or not set(self.ladder) <= set(self.accepted):
            raise ValueError(f"LoraStorage: ladder {self.ladder} must be non-empty and within accepted {self.accepted}")
        if not set(self.by_bits.values()) <= set(self.ladder):
            raise ValueError(f"LoraStorage: by_bits {self.by_bits} names formats outside the ladder {self.ladder}")


@dataclass(frozen=True)
class RuntimeOption:
    """A profile key only this runtime knows (its own option schema): its default fixes its type."""

    name: str
    default: bool | int | str
    help: str

    def problem(self, value) -> str | None:
        """Why ``value`` cannot be this option's value (None: it can)."""
        kind = type(self.default)
        if type(value) is not kind:
            return f"{self.name} must be {dict(bool='true or false', int='a non-negative integer').get(kind.__name__, 'a string')}"
        if kind is int and value < 0:
            return f"{self.name} must be a non-negative integer"
        return None


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything the rest of loradeploy needs to know about one runtime."""

    name: str = field(metadata={"help": "as profiles and manifests name it"})
    distribution: str = field(metadata={"help": "its Python distribution (version → latency fingerprint)"})
    packages: tuple[str, ...] = field(metadata={"help": "distributions whose versions a manifest records"})
    precisions: tuple[str, ...] = field(metadata={"help": "base precisions a profile may ask for"})
    storage: LoraStorage = field(metadata={"help": "how adapter tensors are stored (precision plans)"})
    adapter_suffix: str = field(metadata={"help": "file ending of one adapter in adapters/ ('' for a folder)"})
    target: str = field(metadata={"help": "'module:Class' of its Target (writes artifacts)"})
    session: str = field(metadata={"help": "'module:Class' of its Session (the one loader)"})
    tasks: dict[str, tuple[str, ...]] = field(metadata={
        "help": "base precision → the tasks (kinds.Task values) its profiles export; a profile must budget each "
                "(loradeploy.verdict)"})
    options: tuple[RuntimeOption, ...] = field(default=(), metadata={
        "help": "profile keys only this runtime knows, with their defaults (TargetProfile.options)"})
    formats: str = field(default="", metadata={
        "help": "module whose FORMATS adds this runtime's own storage formats (quant.formats.StorageFormat)"})

    def _load(self, ref: str):
        module, cls = ref.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise LoradeployError(f"runtime {self.name} needs {e.name}: pip install 'loradeploy[all]'") from e

    def target_plugin(self):
        """The runtime's exporter (a :class:`loradeploy.targets.common.Target`)."""
        return self._load(self.target)()

    def session_class(self) -> type:
        """The runtime's session class (a :class:`loradeploy.runtime.session.Session`: the one loader)."""
        return self._load(self.session)


@functools.cache
def _table() -> dict[str, str]:
    """Built-in runtimes, then those registered through :data:`ENTRY_POINT_GROUP` (a built-in
    name cannot be taken over)."""
    from importlib.metadata import entry_points

    table = dict(PLUGINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.value)
    return table


def get(runtime: str) -> RuntimeSpec:
    """The spec of ``runtime``; a :class:`LoradeployError` names the known ones."""
    table = _table()
    if runtime not in table:
        raise LoradeployError(f"runtime {runtime!r} is not supported (available: {', '.join(table)})")
    module, _, attr = table[runtime].partition(":")
    try:
        spec = getattr(importlib.import_module(module), attr or "SPEC")
    except (ImportError, AttributeError) as e:
        raise LoradeployError(f"runtime {runtime!r}: its plugin {table[runtime]!r} cannot be loaded ({e})") from e
    if not isinstance(spec, RuntimeSpec) or spec.name != runtime:
        raise LoradeployError(f"runtime {runtime!r}: {table[runtime]} is not a RuntimeSpec named {runtime!r}")
    return spec


@functools.cache
def storage_formats() -> dict:
    """Every storage format the runtimes' plugins add (their ``formats`` modules' ``FORMATS``)."""
    table = {}
    for spec in specs():
        if spec.formats:
            table.update(importlib.import_module(spec.formats).FORMATS)
    return table


def names() -> tuple[str, ...]:
    return tuple(_table())


def specs() -> list[RuntimeSpec]:
    return [get(name) for name in _table()]
