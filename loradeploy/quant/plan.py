"""A quantization plan: the stored format of every LoRA tensor of an adapter, per runtime.

Tensors are named ``<module>.lora_A`` / ``<module>.lora_B`` (the adapter's module names). What
is quantized is what the runtime stores, as its :class:`~loradeploy.registry.LoraStorage` says,
laid out so that rows are the runtime's grouping: ``A [r, in]``; ``B`` with the scale (and rank
gates) folded in or not (``folds_scale``), as ``(s·B)ᵀ [r, out]`` (per-rank rows) or
``[out, r]`` (``b_rank_major``; GGML block types then need r a multiple of 32).

``quantize_adapter`` applies a plan: it returns the stored form per tensor (what targets
write) and an :class:`~loradeploy.ir.AdapterSet` holding the values the runtime computes
with, for measuring fidelity in PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import registry
from ..errors import PlanError
from ..ir import AdapterSet, LoraModule
from ..registry import LoraStorage
from .formats import Quantized, fits, format_for_bits, quantize

PLAN_VERSION = 1
ROLES = ("lora_A", "lora_B")


def tensor_key(module: str, role: str) -> str:
    return f"{module}.{role}"


def stored_matrix(m: LoraModule, role: str, storage: LoraStorage) -> np.ndarray:
    """The matrix the runtime stores for ``role`` of ``m``, rows = its quantization grouping."""
    if role == "lora_A":
        return m.lora_A.to(torch.float32).numpy()
    if not storage.folds_scale:
        return m.lora_B.to(torch.float32).numpy()
    b = m.folded_b().to(torch.float32).numpy()
    return np.ascontiguousarray(b.T) if storage.b_rank_major else b


def stored_shape(m: LoraModule, role: str, storage: LoraStorage) -> tuple[int, int]:
    """The shape of :func:`stored_matrix` (rows, row length), without forming it."""
    if role == "lora_A":
        return m.rank, m.in_features
    return (m.rank, m.out_features) if (storage.folds_scale and storage.b_rank_major) else (m.out_features, m.rank)


def _row_length(m: LoraModule, role: str, storage: LoraStorage) -> int:
    return stored_shape(m, role, storage)[1]


def allowed_formats(m: LoraModule, role: str, storage: LoraStorage) -> tuple[str, ...]:
    """The runtime's ladder, minus formats this tensor's rows cannot take (block types)."""
    row = _row_length(m, role, storage)
    return tuple(f for f in storage.ladder if fits(f, row))


def _from_stored(values: np.ndarray, m: LoraModule, role: str, storage: LoraStorage) -> torch.Tensor:
    """Back to the IR orientation (B unfolded stays folded: the returned module has scale 1)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return t.T.contiguous() if (role == "lora_B" and storage.b_rank_major) else t


def _stored(matrix: np.ndarray, fmt: str, m: LoraModule, role: str, storage: LoraStorage,
            gram: np.ndarray | None):
    """``matrix`` in ``fmt``: nearest rounding, or output-aware against the module's input gram."""
    from .rounding import ROUNDED_FORMATS, round_along_columns, round_along_rows

    if gram is None or fmt not in ROUNDED_FORMATS:
        return quantize(matrix, fmt)
    if role == "lora_A":
        return round_along_columns(matrix, fmt, gram)
    a = m.lora_A.to(torch.float64).numpy()
    if not storage.b_rank_major:  # [out, r]: B's inputs (Z = X Aᵀ) are its columns, as for lora_A
        return round_along_columns(matrix, fmt, a @ gram @ a.T)
    return round_along_rows(matrix, fmt, a @ gram @ a.T)


@dataclass
class QuantizedAdapter:
    """An adapter with a plan applied: stored form per tensor and the values computed with."""

    runtime: str
    formats: dict[str, str]
    stored: dict[str, Quantized]
    simulated: AdapterSet

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.stored.values())


def quantize_adapter(adapters: AdapterSet, runtime: str, formats: dict[str, str],
                     ranks: dict[str, int] | None = None, grams: dict[str, np.ndarray] | None = None) -> QuantizedAdapter:
    """Apply ``formats`` (tensor key → format) to a pruned, gate-free adapter, its modules first
    truncated to ``ranks`` (module → rank, SVD) where given. ``grams`` (module → XᵀX of its
    calibration inputs): integer formats then store the codes output-aware rounding chooses
    (:mod:`.rounding`) instead of the nearest ones."""
    from .rank import truncate_adapter

    adapters = truncate_adapter(adapters, ranks)
    storage = registry.get(runtime).storage
    stored, modules = {}, {}
    for name, m in adapters.modules.items():
        values = {}
        for role in ROLES:
            key = tensor_key(name, role)
            fmt = formats.get(key)
            if fmt is None:
                raise PlanError(f"the plan has no format for tensor {key}")
            if fmt not in storage.accepted:
                raise PlanError(f"tensor {key}: format {fmt!r} is not one {runtime} stores "
                                f"({', '.join(storage.accepted)})")
            matrix = stored_matrix(m, role, storage)
            if not fits(fmt, matrix.shape[1]):
                raise PlanError(f"tensor {key}: {fmt} needs rows of whole 32-blocks, this one has rows of "
                                f"{matrix.shape[1]}")
            stored[key] = _stored(matrix, fmt, m, role, storage, (grams or {}).get(name))
            values[role] = _from_stored(stored[key].dequantized, m, role, storage)
        modules[name] = LoraModule(name, values["lora_A"], values["lora_B"], 1.0 if storage.folds_scale else m.scale)
    sim = AdapterSet(adapters.method, modules, dict(adapters.extra_tensors), adapters.base_model_hint,
                     dict(adapters.hyperparameters), list(adapters.sources), list(adapters.notes),
                     adapters.declared_task)
    return QuantizedAdapter(runtime, dict(formats), stored, sim)


def uniform_formats(adapters: AdapterSet, runtime: str, fmt: str) -> dict[str, str]:
    """Every tensor in ``fmt``, or the nearest higher format its shape allows."""
    storage = registry.get(runtime).storage
    out = {}
    for name, m in adapters.modules.items():
        for role in ROLES:
            ladder = allowed_formats(m, role, storage)
            full = storage.ladder
            if fmt not in full:
                raise PlanError(f"{runtime} has no {fmt} format ({', '.join(full)})")
            want = full.index(fmt)
            fits = [f for f in ladder if full.index(f) <= want]
            out[tensor_key(name, role)] = fits[-1]
    return out


def hinted_formats(adapters: AdapterSet, runtime: str, original: AdapterSet) -> dict[str, str] | None:
    """A B-LoRA adapter's learned bit widths (held by ``original``, the adapter as trained) as a
    plan for its pruned form ``adapters`` (None when it has none)."""
    if not any(m.bits for m in original.modules.values()):
        return None
    storage = registry.get(runtime).storage
    out = {}
    for name, m in adapters.modules.items():
        bits = original.modules[name].bits if name in original.modules else {}
        for role in ROLES:
            ladder = allowed_formats(m, role, storage)
            fmt = format_for_bits(storage.by_bits, bits.get(role, 32))
            full = storage.ladder
            fits = [f for f in ladder if full.index(f) <= full.index(fmt)] if fmt in full else list(ladder[:1])
            out[tensor_key(name, role)] = fits[-1]
    return out


def dense_fp16_bytes_at_max_rank(original: AdapterSet) -> int:
    """Bytes of a dense fp16 LoRA on the same modules at the adapter's trained maximum rank (the
    largest rank any module holds as trained: SoRA/B-LoRA's initial r, the rank IncreLoRA grew
    its largest module to) — the adapter a fixed-rank LoRA of the same capacity would ship."""
    r_max = max(m.rank for m in original.modules.values())
    return sum(2 * r_max * (m.in_features + m.out_features) for m in original.modules.values())


# --- plan files ------------------------------------------------------------------------------

@dataclass
class Plan:
    """Formats per adapter (by adapter name) and what was measured choosing them."""

    runtime: str
    target: str
    adapters: dict[str, dict] = field(default_factory=dict)  # name → {"formats": {...}, ...}
    budget: dict = field(default_factory=dict)
    method: str = "learned"
    #: adapter → module → XᵀX of its calibration inputs, for entries whose ``rounding`` is
    #: "output-aware" (in memory only: a plan file's are measured again when it is applied)
    grams: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def formats_for(self, adapter_name: str, adapters: AdapterSet, source: str = "plan") -> dict[str, str]:
        if adapter_name in self.adapters:
            entry = self.adapters[adapter_name]
        elif len(self.adapters) == 1:
            entry = next(iter(self.adapters.values()))
        else:
            raise PlanError(f"{source}: no plan for adapter {adapter_name!r} (has: {', '.join(self.adapters)})")
        formats = entry["formats"]
        wanted = {tensor_key(n, r) for n in adapters.modules for r in ROLES}
        missing = sorted(wanted - set(formats))
        extra = sorted(set(formats) - wanted)
        if missing or extra:
            what = f"no format for {missing[0]}" if missing else f"tensor {extra[0]} is not in the adapter"
            raise PlanError(f"{source}: the plan does not fit adapter {adapter_name!r}: {what} "
                            "(plans are made for the pruned adapter: run `loradeploy quantize` on it)")
        return dict(formats)

    def ranks_for(self, adapter_name: str, adapters: AdapterSet, source: str = "plan") -> dict[str, int] | None:
        """Modules the plan truncates → rank (None: none), checked against the pruned adapter."""
        entry = self.adapters.get(adapter_name) or (next(iter(self.adapters.values())) if len(self.adapters) == 1 else {})
        ranks = entry.get("ranks") or {}
        out = {}
        for name, pair in ranks.items():
            k = pair[1] if isinstance(pair, list) else pair
            if name not in adapters.modules or not isinstance(k, int) or not 1 <= k <= adapters.modules[name].rank:
                raise PlanError(f"{source}: rank {k!r} for module {name} does not fit adapter {adapter_name!r}")
            if k < adapters.modules[name].rank:
                out[name] = k
        return out or None

    def to_dict(self) -> dict:
        return {"plan_version": PLAN_VERSION, "runtime": self.runtime, "target": self.target,
                "method": self.method, "budget": self.budget, "adapters": self.adapters}

    def save(self, path: Path) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"{path}: not a JSON plan file ({e})") from e
        if not isinstance(data, dict) or data.get("plan_version") != PLAN_VERSION:
            raise PlanError(f"{path}: not a loradeploy quantization plan (plan_version {PLAN_VERSION})")
        runtime = data.get("runtime")
        if runtime not in registry.names():
            raise PlanError(f"{path}: unknown runtime {runtime!r}")
        accepted = registry.get(runtime).storage.accepted
        adapters = data.get("adapters")
        if not isinstance(adapters, dict) or not adapters:
            raise PlanError(f"{path}: the plan lists no adapters")
        for name, entry in adapters.items():
            formats = entry.get("formats") if isinstance(entry, dict) else None
            if not isinstance(formats, dict) or not formats:
                raise PlanError(f"{path}: adapter {name!r} has no formats")
            for key, fmt in formats.items():
                if fmt not in accepted:
                    raise PlanError(f"{path}: tensor {key}: format {fmt!r} is not one {runtime} stores "
                                    f"({', '.join(accepted)})")
        return cls(runtime, str(data.get("target", "")), adapters, data.get("budget") or {},
                   str(data.get("method", "learned")))


@dataclass(frozen=True)
class LearnedPlan:
    """Search a plan under a fidelity budget (or a byte limit)."""

    def __str__(self) -> str:
        return "learned"


@dataclass(frozen=True)
class UniformPlan:
    """Every tensor at one nominal bit width (the baseline)."""

    bits: int

    def __str__(self) -> str:
        return f"uniform:{self.bits}"


@dataclass(frozen=True)
class PlanFile:
    """A plan written by ``loradeploy quantize``."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


PlanChoice = LearnedPlan | UniformPlan | PlanFile


def parse_plan_choice(text: str) -> PlanChoice:
    """``--plan`` values: ``learned``, ``uniform:BITS`` (32/16/8/5/4) or a plan file path."""
    if text.startswith("uniform:"):
        bits = text.split(":", 1)[1]
        if not bits.isdigit():
            raise PlanError(f"--plan {text}: expected uniform:BITS, e.g. uniform:8")
        return UniformPlan(int(bits))
    if text == "learned":
        return LearnedPlan()
    return PlanFile(Path(text))
