"""Canonical in-memory form of a trained LoRA adapter, whatever method produced it.

Every reader turns its method's checkpoint into an :class:`AdapterSet`; every later stage
(prune, quantize, merge, export) works on this form only.

For one adapted linear layer (:class:`LoraModule`)::

    ΔW = scale · B · diag(gate ⊙ rank_mask) · A        A: [r, in], B: [out, r]

``gate`` carries a method's per-rank multiplier (SoRA gate, IncreLoRA/AdaLoRA E, B-LoRA E);
``rank_mask`` carries ranks the method switched off without zeroing their numbers (B-LoRA's
closed hard-concrete gates). Both are optional; a plain LoRA module has neither.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import IRError
from .kinds import Method, Task  # noqa: F401  (the IR's names for them, as before)


#: Roles of the tensors a module stores, as used in bit-width hints and quantization plans.
TENSOR_ROLES = ("lora_A", "lora_B", "gate")


def _check_finite(name: str, role: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise IRError(f"module {name}: {role} holds {bad} NaN/Inf value(s)")


@dataclass
class LoraModule:
    """One adapted linear layer. ``name`` is the layer's path in the model the adapter was
    trained on (e.g. ``bert.encoder.layer.0.attention.self.query``)."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    gate: torch.Tensor | None = None
    rank_mask: torch.Tensor | None = None
    bits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        A, B = self.lora_A, self.lora_B
        if A.dim() != 2 or B.dim() != 2:
            raise IRError(
                f"module {self.name}: lora_A and lora_B must be matrices, "
                f"got shapes {list(A.shape)} and {list(B.shape)}"
            )
        if A.shape[0] != B.shape[1]:
            raise IRError(
                f"module {self.name}: rank mismatch, lora_A is {list(A.shape)} [r,in] but "
                f"lora_B is {list(B.shape)} [out,r]"
            )
        if A.shape[0] == 0:
            raise IRError(f"module {self.name}: rank 0 (lora_A is {list(A.shape)})")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise IRError(f"module {self.name}: lora_A/lora_B must be floating point")
        if not math.isfinite(self.scale):
            raise IRError(f"module {self.name}: scale is {self.scale}")
        r = A.shape[0]
        if self.gate is not None:
            self.gate = self.gate.reshape(-1) if self.gate.numel() == r else self.gate
            if self.gate.dim() != 1 or self.gate.numel() != r:
                raise IRError(
                    f"module {self.name}: gate has {self.gate.numel()} entries "
                    f"(shape {list(self.gate.shape)}) but the rank is {r}"
                )
        if self.rank_mask is not None:
            self.rank_mask = self.rank_mask.reshape(-1).to(torch.bool)
            if self.rank_mask.numel() != r:
                raise IRError(
                    f"module {self.name}: rank mask has {self.rank_mask.numel()} entries "
                    f"but the rank is {r}"
                )
        for role, t in (("lora_A", A), ("lora_B", B), ("gate", self.gate)):
            if t is not None:
                _check_finite(self.name, role, t)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    def rank_gain(self) -> torch.Tensor:
        """Per-rank multiplier ``gate ⊙ rank_mask`` in float64 (ones for plain LoRA)."""
        g = torch.ones(self.rank, dtype=torch.float64)
        if self.gate is not None:
            g = g * self.gate.to(torch.float64)
        if self.rank_mask is not None:
            g = g * self.rank_mask.to(torch.float64)
        return g

    def folded_b(self) -> torch.Tensor:
        """``scale · B · diag(gate ⊙ mask)`` in float64 ``[out, r]``: the B that runtimes storing
        one plain product (ONNX inputs, GGUF ``lora_b``) keep, so ΔW = folded_b · A."""
        return self.lora_B.to(torch.float64) * self.rank_gain() * self.scale

    def live_ranks(self) -> torch.Tensor:
        """Boolean ``[r]``: ranks whose contribution to ΔW is not exactly zero."""
        a_live = (self.lora_A != 0).any(dim=1)
        b_live = (self.lora_B != 0).any(dim=0)
        return (self.rank_gain() != 0) & a_live & b_live

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW ``[out, in]`` computed in ``dtype`` (float64 by default, for exactness checks)."""
        B = self.lora_B.to(dtype) * self.rank_gain().to(dtype)
        return (B @ self.lora_A.to(dtype)) * self.scale

    def num_params(self) -> int:
        n = self.lora_A.numel() + self.lora_B.numel()
        return n + (self.gate.numel() if self.gate is not None else 0)

    def num_bytes(self) -> int:
        tensors = [self.lora_A, self.lora_B] + ([self.gate] if self.gate is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class SourceFile:
    """A file an adapter was read from, for provenance in manifests."""

    path: str
    sha256: str
    bytes: int


@dataclass
class AdapterSet:
    """A whole adapter: its adapted modules plus what must travel with it."""

    method: Method
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model_hint: str | None = None
    hyperparameters: dict[str, object] = field(default_factory=dict)
    sources: list[SourceFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    declared_task: Task | None = None  # what the adapter's own config says (PEFT task_type, architectures)
    label_names: tuple[str, ...] | None = None  # class names by label id (a config's ``id2label``)

    def __post_init__(self) -> None:
        if not self.modules:
            raise IRError("no LoRA modules: the adapter is empty")
        for key, t in self.extra_tensors.items():
            _check_finite(key, "tensor", t)

    @property
    def task(self) -> Task:
        """The task the adapter's config declares; else sequence classification when a classifier
        head travels with it, a causal LM when its modules are named as in decoder LMs
        (``model.layers.N.self_attn.q_proj``: Llama, Gemma, Qwen, Mistral), else feature extraction."""
        return self.task_and_source[0]

    @property
    def task_and_source(self) -> tuple[Task, str]:
        """:attr:`task` and where it was read from."""
        if self.declared_task is not None:
            return self.declared_task, "the adapter's config"
        if any(k.startswith(HEAD_PREFIXES) for k in self.extra_tensors):
            return Task.SEQUENCE_CLASSIFICATION, "a classifier head travels with it"
        if self.modules and all(DECODER_MODULE.search(n) for n in self.modules):
            return Task.CAUSAL_LM, "its module names are a decoder LM's (layers.N.self_attn / mlp)"
        return Task.FEATURE_EXTRACTION, "no head and no task in its files"

    @property
    def num_labels(self) -> int | None:
        """Output size of the head's final projection (``out_proj`` for RoBERTa-style heads)."""
        heads = sorted(
            (k for k, t in self.extra_tensors.items()
             if k.startswith(HEAD_PREFIXES) and k.endswith("weight") and t.dim() == 2),
            key=lambda k: ("out_proj" in k, k),
        )
        return int(self.extra_tensors[heads[-1]].shape[0]) if heads else None

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())

    def num_bytes(self) -> int:
        return sum(m.num_bytes() for m in self.modules.values())

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.extra_tensors.values())

    def primary_source(self) -> Path | None:
        return Path(self.sources[0].path) if self.sources else None


#: Top-level module names of task heads that travel with an adapter, by model family.
HEAD_PREFIXES: tuple[str, ...] = (
    "classifier.",  # BERT/DeBERTa/RoBERTa *ForSequenceClassification
    "score.",  # Llama/Gemma/Mistral *ForSequenceClassification
    "classification_head.",  # BART *ForSequenceClassification
    "qa_outputs.",  # *ForQuestionAnswering
)

#: module names of decoder LMs in the Hugging Face layout (Llama, Gemma, Qwen, Mistral)
DECODER_MODULE = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.")
