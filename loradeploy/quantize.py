"""The ``quantize`` verb: a per-tensor precision plan for each adapter on a base and target —
learned (sensitivity + greedy + end-to-end back-off under a fidelity budget), uniform, or
read from a plan file — and the plan applied to the adapters of an export."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import load_tokenizer
from .errors import LoradeployError
from .evaldata import load_calibration
from .ir import Task
from .quant.formats import BY_BITS, LADDERS
from .quant.plan import (Plan, PlanError, dense_fp16_bytes_at_max_rank, hinted_formats, parse_plan_option,
                         quantize_adapter, uniform_formats)
from .quant.search import DEFAULT_BUDGETS, MEASURES, Evaluator, calibration_batches, search
from .targets.common import AdapterEntry

Progress = Callable[[str], None]
CALIBRATION_TEXTS = {Task.CAUSAL_LM: 8}
CALIBRATION_DEFAULT = 64
CALIBRATION_MAX_LENGTH = {Task.CAUSAL_LM: 48}


def parse_budget(text: str | None, task: Task) -> tuple[str, float]:
    """``--budget MEASURE=VALUE`` or ``--budget VALUE`` (the task's measure)."""
    measure = MEASURES[task]
    if not text:
        return measure, DEFAULT_BUDGETS[measure]
    name, sep, value = text.partition("=")
    if not sep:
        name, value = measure, text
    if name != measure:
        raise LoradeployError(f"--budget {text}: a {task.value} plan is held to {measure} (e.g. {measure}=0.01)")
    try:
        v = float(value)
    except ValueError:
        raise LoradeployError(f"--budget {text}: {value!r} is not a number") from None
    if not v > 0:
        raise LoradeployError(f"--budget {text}: must be positive")
    return measure, v


def _entry_record(entry: AdapterEntry, runtime: str, formats: dict[str, str], how: str) -> dict:
    q = quantize_adapter(entry.pruned, runtime, formats)
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    top = LADDERS[runtime][0]
    fp32 = quantize_adapter(entry.pruned, runtime, {k: top for k in formats}).nbytes
    return {"formats": dict(sorted(formats.items())), "format_counts": dict(sorted(counts.items())),
            "chosen_by": how, "bytes": q.nbytes, "bytes_highest_precision": fp32,
            "bytes_dense_fp16_max_rank": dense_fp16_bytes_at_max_rank(entry.original),
            "bit_hints": {f"{n}.{r}": b for n, m in entry.original.modules.items() for r, b in m.bits.items()}}


def plan_for(entries: list[AdapterEntry], runtime: str, target: str, option: str, base_model, base_dir: Path,
             task: Task, budget: str | None = None, max_bytes: int | None = None,
             calibration: Path | None = None, progress: Progress | None = None) -> Plan:
    """A plan for every entry: ``option`` is ``learned``, ``uniform:BITS`` or a plan file."""
    step = progress or (lambda _m: None)
    kind, value = parse_plan_option(option)
    if kind == "file":
        plan = Plan.load(value)
        if plan.runtime != runtime:
            raise PlanError(f"{value}: the plan is for {plan.runtime}, the target runs {runtime}")
        adapters = {e.name: {**plan.adapters.get(e.name, next(iter(plan.adapters.values()))),
                             **_entry_record(e, runtime, plan.formats_for(e.name, e.pruned, str(value)), "plan file")}
                    for e in entries}
        return Plan(runtime, target, adapters, plan.budget, f"file:{value}")
    if kind == "uniform":
        if value not in BY_BITS[runtime]:
            raise PlanError(f"--plan uniform:{value}: {runtime} stores LoRA tensors in "
                            + ", ".join(f"{b} ({f})" for b, f in sorted(BY_BITS[runtime].items(), reverse=True)))
        fmt = BY_BITS[runtime][value]
        adapters = {e.name: _entry_record(e, runtime, uniform_formats(e.pruned, runtime, fmt), f"uniform:{value}")
                    for e in entries}
        return Plan(runtime, target, adapters, {}, f"uniform:{value}")
    measure, limit = parse_budget(budget, task)
    texts = load_calibration(calibration, CALIBRATION_TEXTS.get(task, CALIBRATION_DEFAULT), lm=task is Task.CAUSAL_LM)
    batches = calibration_batches(load_tokenizer(base_dir), texts.texts, task, CALIBRATION_MAX_LENGTH.get(task, 128))
    adapters = {}
    for e in entries:
        step(f"calibrating {e.name} on {len(texts.texts)} texts")
        ev = Evaluator(base_model, e.pruned, runtime, task, batches)
        result = search(ev, None if max_bytes else limit, max_bytes,
                        hinted_formats(e.pruned, runtime, e.original), progress=step)
        record = _entry_record(e, runtime, result.formats, "learned")
        record.update({"chosen_from": result.chosen_from, "measured_pytorch": result.measured,
                       "predicted": {measure: result.predicted}, "evaluations": ev.evaluations,
                       "checked_plans": result.curve, "sensitivity": result.sensitivity,
                       "tensor_bytes": result.tensor_bytes, "start_plan": result.start})
        adapters[e.name] = record
    from .quant.search import DEFAULT_FLOORS

    budget_record = ({"measure": measure, "max": limit, "floors": DEFAULT_FLOORS.get(task, {})} if not max_bytes
                     else {"max_bytes": max_bytes})
    budget_record["calibration"] = {"source": str(texts.path), "texts": len(texts.texts)}
    return Plan(runtime, target, adapters, budget_record, "learned")


def apply_plan(entries: list[AdapterEntry], plan: Plan) -> None:
    for e in entries:
        e.quantized = quantize_adapter(e.pruned, plan.runtime, plan.adapters[e.name]["formats"])
