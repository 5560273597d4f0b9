"""The ``quantize`` verb: a per-tensor precision plan for each adapter on a base and target —
learned (sensitivity + greedy + end-to-end back-off under a fidelity budget), uniform, or
read from a plan file — and the plan applied to the adapters of an export."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from . import registry
from .base import load_tokenizer, resolve_base
from .errors import LoradeployError, OutputError
from .evaldata import MAX_LENGTH, load_calibration
from .ir import Task
from .job import AdapterEntry, AdapterInputs, ExportJob, load_base_for, load_entries
from .progress import Progress, steps
from .quant.plan import (LearnedPlan, Plan, PlanChoice, PlanError, PlanFile, UniformPlan,
                         dense_fp16_bytes_at_max_rank, hinted_formats, quantize_adapter, uniform_formats)
from .quant.evaluator import Evaluator, calibration_batches
from .quant.search import DEFAULT_BUDGETS, HOLDOUT_DEFAULT, HOLDOUT_SLACK, HOLDOUT_TEXTS, MEASURES, search

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


def _entry_record(entry: AdapterEntry, runtime: str, formats: dict[str, str], how: str,
                  ranks: dict[str, int] | None = None, grams: dict | None = None) -> dict:
    """``grams`` (module → XᵀX): ranks are truncated output-aware (energy kept: of ‖ΔW L‖²)."""
    from .quant.rank import energy_kept

    q = quantize_adapter(entry.pruned, runtime, formats, ranks)
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    top = registry.get(runtime).storage.ladder[0]
    fp32 = quantize_adapter(entry.pruned, runtime, {k: top for k in formats}).nbytes
    return {"formats": dict(sorted(formats.items())), "format_counts": dict(sorted(counts.items())),
            "chosen_by": how, "bytes": q.nbytes, "bytes_highest_precision": fp32,
            "bytes_dense_fp16_max_rank": dense_fp16_bytes_at_max_rank(entry.original),
            "bit_hints": {f"{n}.{r}": b for n, m in entry.original.modules.items() for r, b in m.bits.items()},
            # modules the plan truncates by SVD: [rank after exact pruning, rank shipped], share of ‖ΔW‖² kept
            "ranks": {n: [entry.pruned.modules[n].rank, k] for n, k in sorted((ranks or {}).items())},
            "energy_kept": {n: energy_kept(entry.pruned.modules[n], k, (grams or {}).get(n))
                            for n, k in sorted((ranks or {}).items())},
            "truncation": ("output-aware" if grams else "plain") if ranks else None}


@dataclass(frozen=True)
class PlanConfig:
    """How adapter tensors are stored (swappable artifacts)."""

    choice: PlanChoice | None = field(default=None, metadata={"help": "learned, uniform:BITS or a plan file; "
                                                                       "None: the profile's plan, else as trained"})
    budget: str | None = field(default=None, metadata={"help": "learned: [MEASURE=]VALUE (see parse_budget)"})
    max_bytes: int | None = field(default=None, metadata={"help": "learned: least error within this many bytes"})
    calibration: Path | None = field(default=None, metadata={"help": "calibration texts (default: the examples')"})
    ranks: bool = field(default=True, metadata={"help": "learned: also lower module ranks (SVD truncation)"})
    output_aware: bool = field(default=True, metadata={"help": "learned: integer codes and truncated ranks chosen "
                                                                "against the calibration inputs (else nearest, plain SVD)"})
    peft_anchor: bool = field(default=False, metadata={"help": "learned: also measure PEFT's convert_to_lora "
                                                                 "(loradeploy.quant.anchor) for the report's plot"})

    @classmethod
    def parse(cls, plan: str | None, **options) -> "PlanConfig":
        """From the ``--plan`` text (``learned``, ``uniform:BITS``, a file; None: the profile's)."""
        from .quant.plan import parse_plan_choice

        return cls(parse_plan_choice(plan) if plan else None, **options)

    def __post_init__(self):
        if self.max_bytes is not None and self.max_bytes < 1:
            raise LoradeployError(f"--max-bytes {self.max_bytes}: must be at least 1")


def uniform_format(runtime: str, bits: int) -> str:
    """The format ``uniform:BITS`` stores tensors in on ``runtime``; a PlanError names the widths it has."""
    storage = registry.get(runtime).storage
    if bits not in storage.by_bits:
        raise PlanError(f"--plan uniform:{bits}: {runtime} stores LoRA tensors in "
                        + ", ".join(f"{b} ({f})" for b, f in sorted(storage.by_bits.items(), reverse=True)))
    return storage.by_bits[bits]


def plan_for(job: ExportJob, config: PlanConfig, progress: Progress | None = None) -> Plan:
    """A plan for every adapter of ``job`` on its base and target, as ``config.choice`` says
    (learned when None)."""
    step = steps(progress)
    entries, runtime, target = job.adapters, job.profile.runtime, job.profile.name
    base_model, base_dir, task = job.base_model, job.base_dir, job.task
    choice = config.choice or LearnedPlan()
    storage = registry.get(runtime).storage
    if isinstance(choice, PlanFile):
        value = choice.path
        plan = Plan.load(value)
        if plan.runtime != runtime:
            raise PlanError(f"{value}: the plan is for {plan.runtime}, the target runs {runtime}")
        recorded = {e.name: plan.adapters.get(e.name, next(iter(plan.adapters.values()))) for e in entries}
        grams = {}
        rounded = [e for e in entries if recorded[e.name].get("rounding") == "output-aware"
                   or recorded[e.name].get("truncation") == "output-aware"]
        if rounded:  # codes or ranks chosen against the calibration inputs: measure them again
            texts = _recorded_calibration(plan.budget.get("calibration") or {}, task, str(value))
            batches = calibration_batches(load_tokenizer(base_dir), texts.texts, task,
                                          CALIBRATION_MAX_LENGTH.get(task, MAX_LENGTH))
            for e in rounded:
                step(f"calibrating {e.name} on {len(texts.texts)} texts (the plan is output-aware)")
                ev = Evaluator(base_model, e.pruned, runtime, task, batches)
                grams[e.name] = {n: ev.gram(n) for n in e.pruned.modules}
        adapters = {}
        for e in entries:
            ranks = plan.ranks_for(e.name, e.pruned, str(value))
            truncation_grams = grams.get(e.name) if recorded[e.name].get("truncation") == "output-aware" else None
            adapters[e.name] = {**recorded[e.name],
                                **_entry_record(e, runtime, plan.formats_for(e.name, e.pruned, str(value)), "plan file",
                                                ranks, truncation_grams)}
        return Plan(runtime, target, adapters, plan.budget, f"file:{value}", grams)
    if isinstance(choice, UniformPlan):
        value = choice.bits
        fmt = uniform_format(runtime, value)
        adapters = {e.name: _entry_record(e, runtime, uniform_formats(e.pruned, runtime, fmt), f"uniform:{value}")
                    for e in entries}
        return Plan(runtime, target, adapters, {}, f"uniform:{value}")
    budget, max_bytes, calibration = config.budget, config.max_bytes, config.calibration
    measure, limit = parse_budget(budget, task)
    n_calibration = CALIBRATION_TEXTS.get(task, CALIBRATION_DEFAULT)
    # the texts after the calibration ones, from the same source, are held out: the plan must hold on them too
    texts = load_calibration(calibration, n_calibration + HOLDOUT_TEXTS.get(task, HOLDOUT_DEFAULT),
                             lm=task is Task.CAUSAL_LM)
    held_out = texts.texts[n_calibration:]
    texts = dataclasses.replace(texts, texts=texts.texts[:n_calibration],
                                labels=texts.labels[:n_calibration] if texts.labels else None)
    tokenizer = load_tokenizer(base_dir)
    max_length = CALIBRATION_MAX_LENGTH.get(task, MAX_LENGTH)
    batches = calibration_batches(tokenizer, texts.texts, task, max_length)
    held_out_batches = calibration_batches(tokenizer, held_out, task, max_length) if held_out else None
    step(f"tokenized {len(texts.texts)} calibration and {len(held_out)} held-out texts")
    adapters, grams = {}, {}
    for e in entries:
        ev = Evaluator(base_model, e.pruned, runtime, task, batches, rounding=config.output_aware,
                       truncation="output-aware" if config.output_aware else "plain")
        step(f"calibrated {e.name}: the fp32 adapter's outputs and each module's inputs on {len(texts.texts)} texts")
        holdout = None
        if held_out_batches:
            holdout = Evaluator(base_model, e.pruned, runtime, task, held_out_batches, codes_from=ev)
            step(f"{e.name}: the fp32 adapter's outputs on {len(held_out)} held-out texts")
        result = search(ev, None if max_bytes else limit, max_bytes,
                        hinted_formats(e.pruned, runtime, e.original), progress=step, ranks=config.ranks,
                        holdout=holdout)
        del holdout
        truncation_grams = {n: ev.gram(n) for n in (result.ranks or {})} if ev.truncation == "output-aware" else None
        record = _entry_record(e, runtime, result.formats, "learned", result.ranks, truncation_grams)
        record.update({"rounding": result.rounding, "chosen_from": result.chosen_from, "measured_pytorch": result.measured,
                       "predicted": {measure: result.predicted}, "evaluations": ev.evaluations,
                       "checked_plans": result.curve, "sensitivity": result.sensitivity,
                       "tensor_bytes": result.tensor_bytes, "start_plan": result.start,
                       "uniform_plans": result.uniform, "continued": result.continued, "held_out": result.held_out})
        if config.peft_anchor:
            from .quant.anchor import peft_points

            step(f"PEFT convert_to_lora anchor for {e.name}")
            record["peft_conversion"] = peft_points(ev, base_model, uniform_format(runtime, 16))
        adapters[e.name] = record
        if result.rounding == "output-aware" or record["truncation"] == "output-aware":
            grams[e.name] = {n: ev.gram(n) for n in e.pruned.modules}
    from .quant.search import DEFAULT_FLOORS

    budget_record = ({"measure": measure, "max": limit, "floors": DEFAULT_FLOORS.get(task, {})} if not max_bytes
                     else {"max_bytes": max_bytes, "measure": measure})
    budget_record["calibration"] = {"source": str(texts.path), "texts": len(texts.texts), "default": calibration is None,
                                    "sha256": _texts_digest(texts.texts)}
    budget_record["held_out"] = {"texts": len(held_out), "sha256": _texts_digest(held_out) if held_out else None,
                                 "slack": HOLDOUT_SLACK}
    return Plan(runtime, target, adapters, budget_record, "learned", grams)


def _texts_digest(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n\0".join(texts).encode()).hexdigest()


def _recorded_calibration(record: dict, task: Task, source: str):
    """The calibration texts a plan file was made on (output-aware rounding is measured on them
    again when the plan is applied); a PlanError when they are gone or changed."""
    n = int(record.get("texts") or CALIBRATION_TEXTS.get(task, CALIBRATION_DEFAULT))
    path = None if record.get("default", True) else Path(record.get("source", ""))
    if path is not None and not path.exists():
        raise PlanError(f"{source}: the plan's calibration texts {path} are gone (output-aware rounding needs them)")
    texts = load_calibration(path, n, lm=task is Task.CAUSAL_LM)
    if record.get("sha256") and _texts_digest(texts.texts) != record["sha256"]:
        raise PlanError(f"{source}: the calibration texts differ from those the plan was made on "
                        f"({path or 'the default set'}); run `loradeploy quantize` again")
    return texts


def apply_plan(entries: tuple[AdapterEntry, ...], plan: Plan) -> tuple[AdapterEntry, ...]:
    """The entries with ``plan`` applied (their stored forms); the inputs are left as they are."""
    from .quant.rank import truncate_adapter

    out = []
    for e in entries:
        ranks = plan.ranks_for(e.name, e.pruned)
        entry = plan.adapters[e.name]
        calibrated = entry.get("rounding") == "output-aware" or (ranks and entry.get("truncation") == "output-aware")
        grams = plan.grams.get(e.name) if calibrated else None
        if calibrated and grams is None:
            raise PlanError(f"adapter {e.name!r}: its plan is calibrated (output-aware rounding or truncation) "
                            "and holds no calibration grams")
        # what ships: the plan's ranks (exact pruning where none)
        shipped = truncate_adapter(e.pruned, ranks, grams if entry.get("truncation") == "output-aware" else None)
        if entry.get("rounding") != "output-aware":
            grams = None
        out.append(dataclasses.replace(e, pruned=shipped,
                                       quantized=quantize_adapter(shipped, plan.runtime, entry["formats"], grams=grams)))
    return tuple(out)


@dataclass(frozen=True)
class QuantizeConfig:
    """The ``quantize`` verb's inputs."""

    base: str = field(metadata={"help": "a Hugging Face folder, a GGUF file or an alias"})
    adapters: AdapterInputs = field(metadata={"help": "the adapters (one plan entry each)"})
    target: str = field(metadata={"help": "profile name or YAML path: its runtime decides the formats"})
    out: Path = field(metadata={"help": "the plan file to write (JSON)"})
    plan: PlanConfig = field(default_factory=lambda: PlanConfig(LearnedPlan()))
    overwrite: bool = False


def quantize(config: QuantizeConfig, progress: Progress | None = None) -> dict:
    """Compute a precision plan for the adapters on a base for a target and write it to
    ``config.out`` (JSON; written whole, then renamed into place)."""
    from .profile import load_profile

    step = steps(progress)
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out}: exists (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder for the plan file")
    profile = load_profile(config.target)
    resolve_base(config.base)  # a mistyped base fails now, before the adapters are read
    entries = load_entries(config.adapters)
    step("read and pruned adapters")
    base_dir, task, num_labels, base_model = load_base_for(config.base, entries)
    step("loaded base model")
    job = ExportJob(config.base, base_dir, task, num_labels, entries, profile, "swappable", base_model)
    result = plan_for(job, config.plan, step)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        result.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    record = result.to_dict()
    record["output"] = str(out.absolute())
    return record
