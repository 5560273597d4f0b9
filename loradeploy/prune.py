"""Exact rank pruning: drop the ranks a method zeroed, fold gates into B, keep ΔW.

A rank is dropped when its contribution to ΔW is exactly zero: a zero gate (SoRA), a zero
E (IncreLoRA, AdaLoRA), a closed nested gate (B-LoRA), or an all-zero row of A / column of B.
The per-rank gain is folded into B and the scale is kept, so for every module

    max|ΔW_pruned − ΔW_orig| ≤ 1e-6 · max|ΔW_orig|

which :func:`prune` checks in float64. With ``tolerance > 0`` ranks whose share of ΔW (in
Frobenius norm) is at most ``tolerance`` are dropped too, and the dropped norm is reported.
Modules left with no rank are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import LoradeployError
from .ir import AdapterSet, LoraModule

log = logging.getLogger(__name__)

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
EXACT_RTOL = 1e-6


@dataclass
class PruneConfig:
    tolerance: float = field(default=0.0, metadata={
        "help": "also drop ranks whose ‖ΔW_i‖_F ≤ tolerance · ‖ΔW‖_F (0: only exact zeros)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")


@dataclass
class ModulePruneResult:
    name: str
    rank_before: int
    rank_after: int
    bytes_before: int
    bytes_after: int
    max_abs_error: float  # max|ΔW_pruned − ΔW_orig|
    max_abs_delta: float  # max|ΔW_orig|
    dropped_norm: float  # ‖ΔW_pruned − ΔW_orig‖_F / ‖ΔW_orig‖_F


@dataclass
class PruneReport:
    modules: list[ModulePruneResult]
    tolerance: float

    @property
    def rank_before(self) -> int:
        return sum(m.rank_before for m in self.modules)

    @property
    def rank_after(self) -> int:
        return sum(m.rank_after for m in self.modules)

    @property
    def bytes_before(self) -> int:
        return sum(m.bytes_before for m in self.modules)

    @property
    def bytes_after(self) -> int:
        return sum(m.bytes_after for m in self.modules)

    @property
    def dropped_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.rank_after == 0]

    @property
    def exact(self) -> bool:
        return all(m.max_abs_error <= EXACT_RTOL * m.max_abs_delta + FLOAT32_TINY for m in self.modules)

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "exact": self.exact,
            "rank_before": self.rank_before,
            "rank_after": self.rank_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "dropped_modules": self.dropped_modules,
            "modules": [asdict(m) for m in self.modules],
        }


def _rank_norms(module: LoraModule) -> torch.Tensor:
    """‖ΔW_i‖_F of each rank i (rank-one terms), in float64."""
    gain = module.rank_gain().abs() * abs(module.scale)
    a = module.lora_A.to(torch.float64).norm(dim=1)
    b = module.lora_B.to(torch.float64).norm(dim=0)
    return gain * a * b


def keep_mask(module: LoraModule, tolerance: float) -> torch.Tensor:
    """Ranks to keep: live ones, minus (with a tolerance) those whose share is at most it."""
    keep = module.live_ranks()
    if tolerance > 0:
        total = module.delta_weight().norm()
        keep &= _rank_norms(module) > tolerance * total
    return keep


def prune_module(module: LoraModule, keep: torch.Tensor) -> LoraModule:
    """A gate-free module with only the ``keep`` ranks; the gain is folded into B in float64."""
    dtype = torch.promote_types(module.lora_B.dtype, torch.float32)
    B = (module.lora_B.to(torch.float64) * module.rank_gain())[:, keep].to(dtype)
    A = module.lora_A[keep].to(torch.promote_types(module.lora_A.dtype, torch.float32))
    bits = {k: v for k, v in module.bits.items() if k != "gate"}
    return replace(module, lora_A=A.contiguous(), lora_B=B.contiguous(), gate=None,
                   rank_mask=None, bits=bits)


def _measure(module: LoraModule, pruned: LoraModule | None) -> ModulePruneResult:
    ref = module.delta_weight()
    new = pruned.delta_weight() if pruned is not None else torch.zeros_like(ref)
    diff = new - ref
    ref_norm = float(ref.norm())
    return ModulePruneResult(
        name=module.name,
        rank_before=module.rank,
        rank_after=pruned.rank if pruned is not None else 0,
        bytes_before=module.num_bytes(),
        bytes_after=pruned.num_bytes() if pruned is not None else 0,
        max_abs_error=float(diff.abs().max()),
        max_abs_delta=float(ref.abs().max()),
        dropped_norm=float(diff.norm()) / ref_norm if ref_norm > 0 else 0.0,
    )


def _prune_modules(adapters: AdapterSet, config: PruneConfig) -> tuple[dict[str, LoraModule], PruneReport]:
    kept: dict[str, LoraModule] = {}
    results = []
    for name, module in adapters.modules.items():
        keep = keep_mask(module, config.tolerance)
        pruned = prune_module(module, keep) if bool(keep.any()) else None
        result = _measure(module, pruned)
        # subnormal float32 values carry no relative precision: an error below the smallest normal
        # float32 is rounding of a ΔW that is itself rounding noise (a fuzzed gate of 2e-43)
        if config.tolerance == 0 and result.max_abs_error > EXACT_RTOL * result.max_abs_delta + FLOAT32_TINY:
            raise AssertionError(f"pruning changed ΔW of {name}: {result.max_abs_error:g}")
        results.append(result)
        if pruned is not None:
            kept[name] = pruned
    return kept, PruneReport(results, config.tolerance)


def measure(adapters: AdapterSet, config: PruneConfig | None = None) -> PruneReport:
    """What :func:`prune` would do to each module, without requiring anything to be left."""
    return _prune_modules(adapters, config or PruneConfig())[1]


def prune(adapters: AdapterSet, config: PruneConfig | None = None) -> tuple[AdapterSet, PruneReport]:
    """Prune every module of ``adapters``; returns the pruned set and a per-module report.

    With ``tolerance == 0`` the result's ΔW equals the input's within :data:`EXACT_RTOL`
    (checked; a violation is a bug and raises ``AssertionError``). Raises
    :class:`LoradeployError` when no module keeps a rank (ΔW = 0 everywhere).
    """
    config = config or PruneConfig()
    kept, report = _prune_modules(adapters, config)
    if report.rank_after == report.rank_before and all(
        m.gate is None and m.rank_mask is None for m in adapters.modules.values()
    ):
        log.info("nothing to prune: every rank of every module is live")
        return adapters, report
    if not kept:
        where = adapters.primary_source() or "adapter"
        raise LoradeployError(f"{where}: every module has ΔW = 0, nothing is left after pruning")
    return replace(adapters, modules=kept, notes=list(adapters.notes)), report
