"""The ``export`` verb: read + prune adapters, load the base once, export through the target
plugin into a temporary folder, validate there, write manifest and report, rename into place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import manifest as mf
from .adapters import ReadOptions, read_adapter
from .base import base_task, load_tokenizer, load_torch_model, resolve_base
from .errors import BaseModelError, LoradeployError
from .evaldata import load_eval
from .fsutil import atomic_output_dir
from .ir import Method, Task
from .merge import check_fits
from .prune import prune
from .quantize import apply_plan, plan_for
from .report import write_report
from .targets.common import AdapterEntry, ExportJob, copy_tokenizer, get_target
from .targets.profile import load_profile, parse_profile
from .validate import base_alone_outputs, reference_outputs, validate, validate_lm

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """``NAME=PATH`` or ``PATH`` (the name is then the folder or file stem)."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/")).stem
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise LoradeployError(f"adapter name {name!r}: use letters, digits, '-', '_' or '.'")
        return cls(name, Path(path))


def load_entries(specs: list[AdapterSpec], method: Method | None, options: ReadOptions) -> list[AdapterEntry]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LoradeployError(f"adapter names must differ (got {', '.join(names)}); name them NAME=PATH")
    entries = []
    for spec in specs:
        original = read_adapter(spec.path, method, options)
        pruned, report = prune(original)
        entries.append(AdapterEntry(spec.name, spec.path, original, pruned, report))
    tasks = {(e.original.task, e.original.num_labels) for e in entries}
    if len(tasks) > 1:
        raise LoradeployError("the adapters are for different tasks or label counts: "
                              + ", ".join(f"{e.name}: {e.original.task.value}/{e.original.num_labels}" for e in entries))
    return entries


def load_base_for(base: str, entries: list[AdapterEntry]):
    """The base (the one loader) for these adapters: (folder or file, task, labels, fp32 model),
    with every adapter checked to fit it."""
    base_dir = resolve_base(base)
    task = base_task(base_dir) or entries[0].original.task
    num_labels = entries[0].original.num_labels if task is Task.SEQUENCE_CLASSIFICATION else None
    base_model = load_torch_model(base_dir, task, num_labels)
    _check_fits(base_model, base_dir, entries)
    return base_dir, task, num_labels, base_model


def _check_fits(base_model, base_dir: Path, entries: list[AdapterEntry]) -> None:
    for e in entries:
        try:
            check_fits(base_model, e.original)
        except BaseModelError as err:
            raise BaseModelError(f"{e.source}: does not fit base {base_dir}: {err}") from err


def _adapter_record(e: AdapterEntry, mode: str, suffix: str, plan=None) -> dict:
    record = {
        "name": e.name,
        "method": e.original.method.value,
        "sources": [s.__dict__ for s in e.original.sources],
        "file": f"adapters/{e.name}{suffix}" if mode == "swappable" else None,
        "ranks": {m.name: [m.rank_before, m.rank_after] for m in e.prune_report.modules},
        "rank_total": [e.prune_report.rank_before, e.prune_report.rank_after],
        "lora_bytes": [e.prune_report.bytes_before, e.prune_report.bytes_after],
        "bit_hints": {n: m.bits for n, m in e.original.modules.items() if m.bits},
        "notes": e.original.notes,
    }
    if plan is not None:
        record["plan"] = {"method": plan.method, "budget": plan.budget, **plan.adapters[e.name]}
    return record


def _base_record(spec: str, base_dir: Path) -> dict:
    if base_dir.is_file():
        weights = [base_dir]
    else:
        weights = sorted(p for p in base_dir.glob("*.safetensors")) or sorted(base_dir.glob("*.bin"))
    return {"spec": spec, "path": str(base_dir),
            "weights": [{"file": p.name, "sha256": mf.sha256_file(p)} for p in weights]}


@dataclass(frozen=True)
class PlanOptions:
    """How the adapters' tensors are stored (swappable mode): ``plan`` is ``learned``,
    ``uniform:BITS`` or a plan file (None: the profile's plan, else as trained)."""

    plan: str | None = None
    budget: str | None = None
    max_bytes: int | None = None
    calibration: Path | None = None


def export(base: str, adapters: list[AdapterSpec], target: str, out: Path, mode: str | None = None,
           eval_path: Path | None = None, method: Method | None = None, options: ReadOptions | None = None,
           overwrite: bool = False, progress: Progress | None = None, plan: PlanOptions | None = None) -> dict:
    """Export ``adapters`` on ``base`` for ``target`` into ``out``; returns the manifest."""
    step = progress or (lambda _msg: None)
    options = options or ReadOptions()
    profile = load_profile(target)
    mode = mode or profile.mode
    plugin = get_target(profile.runtime)
    if mode == "merged" and len(adapters) != 1:
        raise LoradeployError(f"merged mode takes exactly one adapter, got {len(adapters)}")
    if mode == "auto" and len(adapters) != 1:
        mode = "swappable"  # several adapters share one base: only swappable holds them
    plan = plan or PlanOptions()
    if mode == "merged" and plan.plan:
        raise LoradeployError("--plan applies to adapters kept beside the base (swappable mode); a merged "
                              "adapter is folded into the base's weights")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        manifest = _export_into(tmp, base, adapters, profile, plugin, mode, eval_path, method, options, step, plan)
    manifest["artifact"] = str(Path(out).absolute())
    return manifest


def _export_into(tmp: Path, base: str, adapters: list[AdapterSpec], profile, plugin, mode: str,
                 eval_path: Path | None, method: Method | None, options: ReadOptions, step: Progress,
                 plan_options: PlanOptions) -> dict:
    entries = load_entries(adapters, method, options)
    step("read and pruned adapters")
    base_dir, task, num_labels, base_model = load_base_for(base, entries)
    step("loaded base model")
    job = ExportJob(base, base_dir, task, num_labels, entries, profile, mode, base_model)
    eval_set = load_eval(eval_path, lm=task is Task.CAUSAL_LM)
    plan_option = plan_options.plan or (profile.plan if mode in ("swappable", "auto") else None)
    if plan_option:
        plan = plan_for(entries, profile.runtime, profile.name, plan_option, base_model, base_dir, task,
                        plan_options.budget, plan_options.max_bytes, plan_options.calibration, step)
        apply_plan(entries, plan)
        job.decisions["plan"] = plan
        step(f"applied precision plan ({plan.method})")
    selection = None
    if mode == "auto":
        mode, selection = _choose_mode(tmp, job, plugin, eval_set, method, options, step)
        job.mode = mode
    decisions = plugin.export(job, tmp)
    if base_dir.is_dir():
        copy_tokenizer(base_dir, tmp)
    step(f"exported {mode} artifact")
    if selection:
        decisions["mode_selection"] = selection
    manifest = _manifest(job, decisions, tmp, method, options)
    mf.write(tmp, manifest)
    manifest["validation"] = _validate(tmp, plugin, manifest, job, eval_set, step)
    if selection:
        _add_other_mode(manifest["validation"], selection, mode)
    step("validated")
    manifest["environment"] = mf.environment()
    mf.write(tmp, manifest)
    write_report(tmp, manifest)
    return manifest


def _choose_mode(tmp: Path, job: ExportJob, plugin, eval_set, method, options, step: Progress) -> tuple[str, dict]:
    """``auto`` mode: export and validate (fidelity only) each mode in a scratch folder; merged
    when it passes the profile's fidelity budget (one file, no adapter path at run time), else
    swappable. Both results go into the manifest; the validation table shows both."""
    import copy as _copy
    import shutil

    candidates = ["merged", "swappable"] if len(job.adapters) == 1 else ["swappable"]
    selection = {}
    for cand in candidates:
        scratch = tmp / f".mode-{cand}"
        scratch.mkdir()
        trial = _copy.copy(job)
        trial.mode = cand
        decisions = plugin.export(trial, scratch)
        if job.base_dir.is_dir():
            copy_tokenizer(job.base_dir, scratch)
        manifest = _manifest(trial, decisions, scratch, method, options)
        mf.write(scratch, manifest)
        result = _validate(scratch, plugin, manifest, trial, eval_set, step, timing=False)
        shutil.rmtree(scratch)
        selection[cand] = {"passed": result["passed"], "metrics": result["metrics"], "checks": result["checks"],
                           "artifact_bytes": result["artifact_bytes"]}
        step(f"tried {cand}: {'passes' if result['passed'] else 'misses'} the fidelity budget")
    chosen = next((c for c in candidates if selection[c]["passed"]), candidates[-1])
    return chosen, {"chosen": chosen, "rule": "merged if it passes the fidelity budget, else swappable",
                    "candidates": selection}


def _add_other_mode(validation: dict, selection: dict, chosen: str) -> None:
    """The modes not shipped, as INFO rows of the validation table."""
    for mode, result in selection["candidates"].items():
        if mode == chosen:
            continue
        for c in result["checks"]:
            if c["adapter"] == "artifact":
                continue
            validation["checks"].append({**c, "adapter": f"{c['adapter']} ({mode}, not shipped: {c['status']})",
                                         "budget": c["budget"], "status": "INFO"})


def _validate(artifact: Path, plugin, manifest: dict, job: ExportJob, eval_set, step: Progress,
              timing: bool = True) -> dict:
    """Validate ``artifact`` against the fp32 references of ``job``'s adapters as trained."""
    profile, task = job.profile, job.task
    runner = plugin.open(artifact, manifest, threads=profile.threads)
    originals = {(e.name if job.mode == "swappable" else None): e.original for e in job.adapters}
    if task is Task.CAUSAL_LM:
        base_runner = runner if job.mode == "swappable" else plugin.open_base(job.base_dir, profile.threads)
        return validate_lm(artifact, runner, profile.runtime, profile, job.base_model, originals, eval_set,
                           base_runner, progress=step, timing=timing)
    tokenizer = load_tokenizer(job.base_dir)
    references = {k: reference_outputs(job.base_model, a, task, tokenizer, eval_set.texts) for k, a in originals.items()}
    base_outputs = {k: base_alone_outputs(job.base_model, a, task, tokenizer, eval_set.texts) for k, a in originals.items()}
    step("computed fp32 reference")
    return validate(artifact, runner, profile.runtime, profile, task, tokenizer, eval_set, references, progress=step,
                    timing=timing, base_outputs=base_outputs)


def _manifest(job: ExportJob, decisions: dict, folder: Path, method: Method | None, options: ReadOptions) -> dict:
    return {
        "manifest_version": mf.MANIFEST_VERSION,
        "tool": mf.tool(),
        "target": {"name": job.profile.name, "runtime": job.profile.runtime, "profile": mf.profile_dict(job.profile)},
        "mode": job.mode,
        "task": job.task.value,
        "num_labels": job.num_labels,
        "base": _base_record(job.base_spec, job.base_dir),
        "read_options": {"format": method.value if method else None, "lora_alpha": options.lora_alpha,
                         "lora_r": options.lora_r, "head": str(options.head) if options.head else None},
        "adapters": [_adapter_record(e, job.mode, get_target(job.profile.runtime).adapter_suffix,
                                     job.decisions.get("plan")) for e in job.adapters],
        "decisions": decisions,
        "files": mf.file_entries(folder),
    }


def revalidate(artifact: Path, eval_path: Path | None = None, progress: Progress | None = None) -> dict:
    """Validate an existing artifact again, rebuilding the reference from the inputs recorded
    in its manifest (their sha256 must still match). Writes nothing."""
    step = progress or (lambda _msg: None)
    manifest = mf.read(artifact)
    profile = parse_profile(Path(manifest["target"]["profile"]["source"]), _profile_data(manifest))
    opts = manifest.get("read_options", {})
    options = ReadOptions(opts.get("lora_alpha"), opts.get("lora_r"), Path(opts["head"]) if opts.get("head") else None)
    method = Method(opts["format"]) if opts.get("format") else None
    specs = []
    for a in manifest["adapters"]:
        src = a["sources"][0]
        if not Path(src["path"]).is_file() or mf.sha256_file(Path(src["path"])) != src["sha256"]:
            raise LoradeployError(f"{src['path']}: the adapter this artifact was exported from is missing or changed")
        specs.append(AdapterSpec(a["name"], Path(src["path"])))
    entries = load_entries(specs, method, options)
    base_dir = resolve_base(manifest["base"]["spec"])
    task = Task(manifest["task"])
    base_model = load_torch_model(base_dir, task, manifest["num_labels"])
    job = ExportJob(manifest["base"]["spec"], base_dir, task, manifest["num_labels"], entries, profile,
                    manifest["mode"], base_model)
    eval_set = load_eval(eval_path, lm=task is Task.CAUSAL_LM)
    result = _validate(Path(artifact), get_target(profile.runtime), manifest, job, eval_set, step)
    return {"artifact": str(Path(artifact).absolute()), "target": profile.name, "mode": manifest["mode"],
            "validation": result}


def _profile_data(manifest: dict) -> dict:
    data = dict(manifest["target"]["profile"])
    data.pop("source", None)
    return data

