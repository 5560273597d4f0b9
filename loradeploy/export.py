"""The ``export`` verb: read + prune adapters, load the base once, export through the runtime's
target plugin into a temporary folder, validate there, write manifest and report, rename into
place. Stages return new values (the job, the entries); none changes another's state."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import manifest as mf
from . import registry
from .base import resolve_base
from .errors import LoradeployError, did_you_mean
from .evaldata import EvalSet, load_eval
from .fsutil import atomic_output_dir, file_sha256
from .ir import Task
from .job import AdapterEntry, AdapterInputs, ExportJob, load_base_for, load_entries
from .kinds import MODES
from .quant.plan import parse_plan_choice
from .quantize import PlanConfig, apply_plan, plan_for
from .report import write_report
from .progress import Progress, begin, steps
from .targets.common import copy_tokenizer
from .profile import TargetProfile, load_profile
from .validate import LatencyRunner, validate_artifact

#: (base spec, adapter entries) → (base folder/file, task, label count, fp32 model): the one base loader
BaseLoader = Callable[[str, tuple], tuple]
#: an export job → (folder holding a graph shared by many artifacts, its decisions), or None
SharedBase = Callable[["ExportJob"], "tuple[Path, dict] | None"]


@dataclass(frozen=True)
class ExportConfig:
    """The ``export`` verb's inputs."""

    base: str = field(metadata={"help": "a Hugging Face folder, a GGUF file or an alias (minilm, gemma3-270m)"})
    adapters: AdapterInputs = field(metadata={"help": "the adapters and how to read them"})
    target: str = field(metadata={"help": "profile name or YAML path"})
    out: Path = field(metadata={"help": "output folder (written whole, then renamed into place)"})
    mode: str | None = field(default=None, metadata={"help": "merged | swappable | auto; None: the profile's"})
    eval_path: Path | None = field(default=None, metadata={"help": "eval set; None: the shipped one for the task"})
    plan: PlanConfig = field(default_factory=PlanConfig)
    overwrite: bool = False
    slots: str | None = field(default=None, metadata={"help": "swappable: modules given LoRA inputs (loradeploy.slots); None: the profile's"})
    allow_ungated: bool = field(default=False, metadata={"help": "a validation no budget applies to may pass (loradeploy.verdict)"})

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise LoradeployError(f"mode {self.mode!r} is not one of {', '.join(MODES)}{did_you_mean(self.mode, MODES)}")


def export(config: ExportConfig, progress: Progress | None = None, load_base: BaseLoader = load_base_for,
           shared: SharedBase | None = None, latency_runner: LatencyRunner | None = None) -> dict:
    """Export ``config.adapters`` on ``config.base`` for ``config.target`` into ``config.out``;
    returns the manifest (as JSON data). ``load_base``, ``shared`` and ``latency_runner`` let a
    caller exporting many artifacts (``loradeploy.fleet``) keep the base loaded, its graph built
    once, and one latency process timing while no other export computes."""
    step = steps(progress)
    profile = load_profile(config.target)
    resolve_base(config.base)  # a mistyped base fails now, before the adapters are read
    n = len(config.adapters.specs)
    mode = config.mode or profile.mode
    if mode == "merged" and n != 1:
        raise LoradeployError(f"merged mode takes exactly one adapter, got {n}")
    if mode == "auto" and n != 1:
        mode = "swappable"  # several adapters share one base: only swappable holds them
    if mode == "merged" and config.plan.choice:
        raise LoradeployError("--plan applies to adapters kept beside the base (swappable mode); a merged "
                              "adapter is folded into the base's weights")
    with atomic_output_dir(config.out, overwrite=config.overwrite) as tmp:
        manifest = _export_into(tmp, config, profile, mode, step, load_base, shared, latency_runner)
    manifest.artifact = str(Path(config.out).absolute())
    return manifest.to_dict()


def _export_into(tmp: Path, config: ExportConfig, profile: TargetProfile, mode: str, step: Progress,
                 load_base: BaseLoader = load_base_for, shared: SharedBase | None = None,
                 latency_runner: LatencyRunner | None = None) -> mf.Manifest:
    begin(step, f"reading and pruning {len(config.adapters.specs)} adapter(s)")
    entries = load_entries(config.adapters)
    step("read and pruned adapters")
    begin(step, f"loading base {config.base}")
    base_dir, task, num_labels, base_model = load_base(config.base, entries)
    step(f"loaded base model ({task.value})")
    job = ExportJob(config.base, base_dir, task, num_labels, entries, profile, mode, base_model,
                    slots=config.slots or profile.slots)
    eval_set = load_eval(config.eval_path, lm=task is Task.CAUSAL_LM)
    step(f"eval set {eval_set.path} ({len(eval_set.texts)} inputs"
         + (", the shipped one)" if config.eval_path is None else ")"))
    choice = config.plan.choice or (parse_plan_choice(profile.plan) if profile.plan and mode != "merged" else None)
    if choice:
        plan = plan_for(job, dataclasses.replace(config.plan, choice=choice), step)
        job = dataclasses.replace(job, adapters=apply_plan(entries, plan), plan=plan)
        step(f"applied precision plan ({plan.method})")
    selection = None
    if mode == "auto":
        chosen, selection = _choose_mode(tmp, job, config.adapters, eval_set, step, config.allow_ungated)
        job = dataclasses.replace(job, mode=chosen)
    begin(step, f"exporting the {job.mode} artifact for {profile.name} ({profile.runtime})")
    manifest = _write(tmp, job, config.adapters, {"mode_selection": selection} if selection else {}, step,
                      shared(job) if shared else None)
    step(f"exported {job.mode} artifact")
    validation = validate_artifact(tmp, job, eval_set, step, allow_ungated=config.allow_ungated,
                                   latency_runner=latency_runner)
    if selection:
        _add_other_mode(validation, selection, job.mode)
    step("validated")
    manifest = dataclasses.replace(manifest, validation=validation,
                                   environment=mf.environment(registry.get(profile.runtime).packages))
    mf.write(tmp, manifest)
    write_report(tmp, manifest.to_dict())
    return manifest


def _write(folder: Path, job: ExportJob, inputs: AdapterInputs, more_decisions: dict | None = None,
           progress: Progress | None = None, shared: tuple[Path, dict] | None = None) -> mf.Manifest:
    """The job's artifact files (through the runtime's target plugin; on the graph at
    ``shared`` when given) and its manifest."""
    plugin = registry.get(job.profile.runtime).target_plugin()
    if shared is not None:
        decisions = plugin.export_on_shared(job, shared[0], shared[1], folder, progress)
    else:
        decisions = plugin.export(job, folder, progress)
    if job.base_dir.is_dir():
        copy_tokenizer(job.base_dir, folder)
    manifest = _manifest(job, {**decisions, **(more_decisions or {})}, folder, inputs)
    mf.write(folder, manifest)
    return manifest


def _choose_mode(tmp: Path, job: ExportJob, inputs: AdapterInputs, eval_set: EvalSet,
                 step: Progress, allow_ungated: bool = False) -> tuple[str, dict]:
    """``auto`` mode: export and validate (fidelity only) each mode in a scratch folder; merged
    when it passes the profile's fidelity budget (one file, no adapter path at run time), else
    swappable. Both results go into the manifest; the validation table shows both."""
    candidates = ["merged", "swappable"] if len(job.adapters) == 1 else ["swappable"]
    selection = {}
    for cand in candidates:
        scratch = tmp / f".mode-{cand}"
        scratch.mkdir()
        trial = dataclasses.replace(job, mode=cand)
        begin(step, f"auto mode: exporting {cand} to compare")
        try:
            _write(scratch, trial, inputs, progress=step)
        except LoradeployError as e:  # this runtime cannot take the adapter in this mode
            shutil.rmtree(scratch)
            selection[cand] = {"passed": False, "exportable": False, "reason": str(e), "checks": []}
            step(f"tried {cand}: not possible ({e})")
            continue
        result = validate_artifact(scratch, trial, eval_set, step, timing=False, allow_ungated=allow_ungated)
        shutil.rmtree(scratch)
        selection[cand] = {"passed": result.passed, "exportable": True, "metrics": result.metrics,
                           "checks": result.checks, "artifact_bytes": result.artifact_bytes}
        step(f"tried {cand}: {'passes' if result.passed else 'misses'} the fidelity budget")
    possible = [c for c in candidates if selection[c]["exportable"]]
    if not possible:
        raise LoradeployError(f"neither mode can be exported: {selection[candidates[-1]]['reason']}")
    chosen = next((c for c in possible if selection[c]["passed"]), possible[-1])
    return chosen, {"chosen": chosen, "rule": "merged if it passes the fidelity budget, else swappable "
                                              "(a mode the runtime cannot take the adapter in is skipped)",
                    "candidates": selection}


def _add_other_mode(validation: mf.Validation, selection: dict, chosen: str) -> None:
    """The modes not shipped, as INFO rows of the validation table."""
    for mode, result in selection["candidates"].items():
        if mode == chosen:
            continue
        for c in result["checks"]:
            if c["adapter"] == "artifact":
                continue
            validation.checks.append({**c, "adapter": f"{c['adapter']} ({mode}, not shipped: {c['status']})",
                                      "budget": c["budget"], "status": "INFO"})


def _adapter_record(e: AdapterEntry, mode: str, suffix: str, plan=None, base_labels=None) -> mf.AdapterRecord:
    labels = e.original.label_names or base_labels
    return mf.AdapterRecord(
        name=e.name, method=e.original.method.value, sources=[s.__dict__ for s in e.original.sources],
        file=f"{mf.ADAPTER_DIR}/{e.name}{suffix}" if mode == "swappable" else None,
        ranks={m.name: [m.rank_before, m.rank_after] for m in e.prune_report.modules},
        rank_total=[e.prune_report.rank_before, e.prune_report.rank_after],
        lora_bytes=[e.prune_report.bytes_before, e.prune_report.bytes_after],
        bit_hints={n: m.bits for n, m in e.original.modules.items() if m.bits}, notes=e.original.notes,
        plan={"method": plan.method, "budget": plan.budget, **plan.adapters[e.name]} if plan is not None else None,
        labels=list(labels) if labels else None)


def _base_labels(job: ExportJob) -> tuple[str, ...] | None:
    """Class names the base's own config gives its head (a classifier base), if any."""
    from .adapters.common import names_from_id2label

    if job.num_labels is None:
        return None
    return names_from_id2label(getattr(job.base_model.config, "id2label", None), job.num_labels)[0]


def _base_record(spec: str, base_dir: Path) -> mf.BaseRecord:
    if base_dir.is_file():
        weights = [base_dir]
    else:
        weights = sorted(p for p in base_dir.glob("*.safetensors")) or sorted(base_dir.glob("*.bin"))
    return mf.BaseRecord(spec, str(base_dir), [{"file": p.name, "sha256": file_sha256(p)} for p in weights])


def _manifest(job: ExportJob, decisions: dict, folder: Path, inputs: AdapterInputs) -> mf.Manifest:
    suffix = registry.get(job.profile.runtime).adapter_suffix
    opts = inputs.options
    return mf.Manifest(
        target=mf.TargetRecord(job.profile.name, job.profile.runtime, mf.profile_dict(job.profile)),
        mode=job.mode, task=job.task.value, num_labels=job.num_labels, base=_base_record(job.base_spec, job.base_dir),
        read_options={"format": inputs.method.value if inputs.method else None, "lora_alpha": opts.lora_alpha,
                      "lora_r": opts.lora_r, "head": str(opts.head) if opts.head else None},
        adapters=[_adapter_record(e, job.mode, suffix, job.plan, _base_labels(job)) for e in job.adapters],
        decisions=decisions, files=mf.file_entries(folder))

