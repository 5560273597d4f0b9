"""The one table of runtimes. Each runtime is one plugin: ``loradeploy/runtime/<rt>.py`` (the
only code that loads an artifact in that runtime, and where the runtime's :class:`RuntimeSpec`
is declared as ``SPEC``) and ``loradeploy/targets/<rt>.py`` (writes its artifacts). Nothing else
names a runtime or branches on one: it asks the spec.

Adding a runtime: write those two files, add one line to :data:`PLUGINS`, add a profile YAML.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import LoradeployError

if TYPE_CHECKING:
    from .runtime.session import Session
    from .targets.common import Target

#: runtime name (as profiles and manifests write it) → the module declaring its ``SPEC``
PLUGINS: dict[str, str] = {
    "onnxruntime": "loradeploy.runtime.onnx",
    "llama.cpp": "loradeploy.runtime.llama",
    "bitsandbytes": "loradeploy.runtime.bnb",
}


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

    def _load(self, ref: str):
        module, cls = ref.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise LoradeployError(f"runtime {self.name} needs {e.name}: pip install 'loradeploy[all]'") from e

    def target_plugin(self) -> "Target":
        """The runtime's export plugin."""
        return self._load(self.target)()

    def session_class(self) -> "type[Session]":
        """The runtime's session class (the one loader)."""
        return self._load(self.session)


def get(runtime: str) -> RuntimeSpec:
    """The spec of ``runtime``; a :class:`LoradeployError` names the known ones."""
    if runtime not in PLUGINS:
        raise LoradeployError(f"runtime {runtime!r} is not supported (available: {', '.join(PLUGINS)})")
    spec = importlib.import_module(PLUGINS[runtime]).SPEC
    if spec.name != runtime:
        raise RuntimeError(f"{PLUGINS[runtime]}.SPEC is named {spec.name!r}, registered as {runtime!r}")
    return spec


def names() -> tuple[str, ...]:
    return tuple(PLUGINS)


def specs() -> list[RuntimeSpec]:
    return [get(name) for name in PLUGINS]
