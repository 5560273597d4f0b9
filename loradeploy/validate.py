"""Validation of an artifact in its runtime against the PyTorch fp32 reference (the base with
the adapter as trained, before pruning): fidelity and task metrics on eval inputs, latency
per benchmark shape and peak RSS (measured in a fresh process holding only the runtime),
artifact bytes — each held against the target profile's budget (the reference:
``reference.py``; the measures and their formulas: ``measures.py``, ``lm_measures.py``).

The artifact is opened through its runtime's session (``loradeploy.runtime.open``), the one
loader every caller uses. Also the ``validate`` verb: an existing artifact validated again."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import measures
from .errors import LoradeployError
from .evaldata import EvalSet, length_order, load_eval
from .ir import AdapterSet, Task
from .lm_measures import GREEDY_PROMPTS, GREEDY_TOKENS, greedy_match, lm_fidelity, lm_reference
from .manifest import MANIFEST, REPORT, Validation
from .reference import base_alone_outputs, batches, in_text_order, reference_outputs, trained_model
from .profile import Budgets, TargetProfile


@dataclass
class Check:
    adapter: str
    measure: str
    value: float
    budget: float | None
    direction: str  # ">=" or "<=" (value must be … budget)

    @property
    def status(self) -> str:
        if self.budget is None:
            return "INFO"
        ok = self.value >= self.budget if self.direction == ">=" else self.value <= self.budget
        return "PASS" if ok else "FAIL"

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


def session_outputs(session, adapter: str | None, tokenizer, texts) -> np.ndarray:
    order = length_order(tokenizer, texts)
    return in_text_order([session.run({"input_ids": ids, "attention_mask": mask}, adapter).outputs
                          for ids, mask in batches(tokenizer, texts, order)], order)


def fidelity(ref: np.ndarray, got: np.ndarray, labels: list[int] | None, task: Task) -> dict:
    """Label agreement, |Δlogit| and accuracy (classifier) or cosine (embeddings)."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        diff = np.abs(got.astype(np.float64) - ref)
        metrics = {
            **measures.logit_errors(ref, got.astype(np.float64)),
            "max_abs_logit_per_class": diff.max(0).tolist(),
            "reference_spread": float(ref.std()),  # scale of the noise floor in `check`
        }
        if labels is not None:
            y = np.asarray(labels)
            metrics["accuracy_reference"] = float((ref.argmax(-1) == y).mean())
            metrics["accuracy"] = float((got.argmax(-1) == y).mean())
            metrics["accuracy_drop"] = metrics["accuracy_reference"] - metrics["accuracy"]
        return metrics
    cos = measures.cosines(ref, got)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "reference_spread": float(ref.std())}


def measure_checks(label: str, metrics: dict, budgets: Budgets, task: Task) -> list[Check]:
    """A check per measure of ``task`` in ``metrics``, against its budget (None: INFO)."""
    return [Check(label, m.name, metrics[m.name], getattr(budgets, m.budget) if m.budget else None, m.direction)
            for m in measures.MEASURES.values() if task.value in m.tasks and m.name in metrics]


#: Runs ``loradeploy.runtime.latency_worker`` with these arguments, returns its record (None: a fresh
#: process per measurement; ``loradeploy.fleet`` passes one process per worker, timing while no unit computes)
LatencyRunner = Callable[[list[str]], dict]


def measure_latency(artifact: Path, adapter: str | None, profile: TargetProfile,
                    runner: LatencyRunner | None = None) -> dict:
    """Latency per shape and peak RSS, measured by ``loradeploy.runtime.latency_worker`` in a process
    holding only the runtime (a fresh one, unless ``runner`` runs it)."""
    args = [str(artifact), "--warmup", str(profile.warmup), "--runs", str(profile.runs),
            "--threads", str(profile.threads)]
    args += [a for s in profile.shapes for a in ("--shape", f"{s.batch}x{s.seq}")]
    if adapter:
        args += ["--adapter", adapter]
    if runner is not None:
        return runner(args)
    proc = subprocess.run([sys.executable, "-m", "loradeploy.runtime.latency_worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoradeployError(f"{artifact}: the latency run failed ({tail})")
    return json.loads(proc.stdout)


def latency_checks(adapter: str, latency: dict, budgets: Budgets) -> list[Check]:
    checks = []
    for label, stats in latency["shapes"].items():
        checks.append(Check(adapter, f"latency_p50_ms[{label}]", stats["p50_ms"], None, "<="))
        checks.append(Check(adapter, f"latency_p95_ms[{label}]", stats["p95_ms"],
                            budgets.latency_p95_ms.get(label), "<="))
    checks.append(Check(adapter, "peak_rss_mb", latency["peak_rss_mb"], None, "<="))
    return checks


def artifact_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()
               and p.name not in (MANIFEST, REPORT))


def _result(artifact: Path, eval_set: EvalSet, metrics: dict, checks: list[Check], profile: TargetProfile,
            first: str | None, timing: bool, progress=None, lm: bool = False,
            latency_runner: LatencyRunner | None = None) -> Validation:
    """Latency (with ``first`` active), size, and the verdict; an LM is timed per prompt length
    (``pp<seq>``) and per generated token (``tg``)."""
    if timing:
        from .progress import begin

        shapes = ([f"pp{seq}" for seq in dict.fromkeys(sh.seq for sh in profile.shapes)] + ["tg"] if lm
                  else [sh.label for sh in profile.shapes])
        begin(progress, f"measuring latency ({', '.join(shapes)}) and peak RSS in a fresh process")
    latency = measure_latency(artifact, first, profile, latency_runner) if timing else {"shapes": {}}
    if timing:
        checks += latency_checks(first or "merged", latency, profile.budgets)
        if progress:
            progress(f"measured latency ({', '.join(latency['shapes'])}) and peak RSS")
    for key, value in latency.get("generation", {}).items():
        checks.append(Check(first or "merged", key, value, None, "<="))
    size = artifact_bytes(artifact)
    checks.append(Check("artifact", "artifact_mb", size / 2**20, profile.budgets.artifact_mb_max, "<="))
    return Validation(str(eval_set.path), len(eval_set.texts), metrics, latency, size, [c.to_dict() for c in checks],
                      all(c.status != "FAIL" for c in checks))


def validate_encoder(artifact: Path, session, profile: TargetProfile, task: Task, tokenizer, eval_set: EvalSet,
                     references: dict[str | None, np.ndarray], progress=None, timing: bool = True,
                     base_outputs: dict[str | None, np.ndarray] | None = None,
                     latency_runner: LatencyRunner | None = None) -> Validation:
    """Run every adapter (``None`` for a merged artifact) on the eval set, compare with its
    reference, measure latency with the first adapter active, and judge against budgets."""
    checks, metrics = [], {}
    for adapter, ref in references.items():
        label = adapter or "merged"
        got = session_outputs(session, adapter, tokenizer, eval_set.texts)
        metrics[label] = fidelity(ref, got, eval_set.labels, task)
        if base_outputs and adapter in base_outputs:
            metrics[label]["adapter_effect_kept"] = measures.adapter_effect_kept(ref, got, base_outputs[adapter])
        checks += measure_checks(label, metrics[label], profile.budgets, task)
        if progress:
            progress(f"fidelity {label}")
    own_metrics, rows = session.runtime_checks(list(eval_set.texts), progress)
    metrics.update(own_metrics)
    checks += [Check("artifact", *row) for row in rows]
    return _result(artifact, eval_set, metrics, checks, profile, next(iter(references)), timing, progress,
                   latency_runner=latency_runner)


# --- causal language models (every runtime that runs them) ----------------------------------

def validate_lm(artifact: Path, session, profile: TargetProfile, base_model, adapters: dict[str | None, AdapterSet],
                eval_set: EvalSet, base_session=None, progress=None, timing: bool = True,
                latency_runner: LatencyRunner | None = None) -> Validation:
    """LM validation: every adapter (``None``: merged artifact) against its PyTorch reference,
    and how much of its effect on the fp32 base alone it keeps; the base alone in the runtime
    (``base_session`` with no adapter vs the PyTorch base) tells how much of the gap is the
    quantized base's; then throughput and switch times. Each stage names itself to ``progress``."""
    from .progress import begin

    step = progress or (lambda _m: None)
    tokens = [session.tokenize(t) for t in eval_set.texts]
    texts = f"{len(tokens)} eval texts ({sum(map(len, tokens))} tokens)"
    begin(step, f"computing the fp32 PyTorch reference of the base alone on {texts}")
    base_ref = lm_reference(base_model, tokens)
    step("computed the base alone's fp32 reference")
    metrics = {}
    for adapter, original in adapters.items():
        label = adapter or "merged"
        begin(step, f"computing the fp32 PyTorch reference of {label} on {texts}")
        merged = trained_model(base_model, original)
        ref = lm_reference(merged, tokens)
        step(f"computed the fp32 reference of {label}")
        begin(step, f"fidelity {label}: the artifact in {session.runtime} on {texts}")
        metrics[label] = lm_fidelity(((r, session.logits(t, adapter), t) for r, t in zip(ref, tokens)), base_ref)
        del ref
        if profile.budgets.greedy_match_min is not None:
            begin(step, f"greedy match {label}: {GREEDY_TOKENS} tokens after {GREEDY_PROMPTS} prompts, in "
                        f"{session.runtime} and in PyTorch")
            metrics[label]["greedy_match"] = greedy_match(session, adapter, merged, tokens)
        step(f"fidelity {label}")
    checks = [c for label, m in metrics.items() for c in measure_checks(label, m, profile.budgets, Task.CAUSAL_LM)]
    if base_session is not None:
        begin(step, f"fidelity base alone: the artifact with no adapter in {session.runtime} on {texts}")
        base = metrics["base alone"] = lm_fidelity((r, base_session.logits(t, None), t)
                                                   for r, t in zip(base_ref, tokens))
        step("fidelity base alone")
        checks += measure_checks("base alone", base, Budgets(), Task.CAUSAL_LM)
        for adapter in adapters:
            m = metrics[adapter or "merged"]
            share = {"kl_excess_vs_base": m["kl_mean"] - base["kl_mean"],
                     "top1_drop_vs_base": base["top1_agreement"] - m["top1_agreement"]}
            m.update(share)
            checks += measure_checks(adapter or "merged", share, profile.budgets, Task.CAUSAL_LM)
    own_metrics, rows = session.runtime_checks(list(eval_set.texts), progress)
    metrics.update(own_metrics)
    checks += [Check("artifact", *row) for row in rows]
    return _result(artifact, eval_set, metrics, checks, profile, next(iter(adapters)), timing, progress, lm=True,
                   latency_runner=latency_runner)


# --- the artifact of a job, and the `validate` verb ------------------------------------------

def validate_artifact(artifact: Path, job, eval_set: EvalSet, progress=None, timing: bool = True,
                      allow_ungated: bool = False, latency_runner: LatencyRunner | None = None) -> Validation:
    """Validate ``artifact`` (written for ``job``) against the fp32 references of the job's
    adapters as trained, in the artifact's runtime (its session: the one loader), and judge it
    (:mod:`loradeploy.verdict`; ``allow_ungated``: a run no budget applies to may pass)."""
    import dataclasses

    from .evaldata import shipped_set_note
    from .verdict import judge

    result = _validate_artifact(artifact, job, eval_set, progress, timing, latency_runner)
    allowed_by = "the profile (allow_ungated: true)" if job.profile.allow_ungated else \
        "--allow-ungated" if allow_ungated else None
    labels = [e.name if job.mode == "swappable" else "merged" for e in job.adapters]
    passed, verdict = judge(result.checks, labels, job.task.value, allowed_by)
    return dataclasses.replace(result, passed=passed, verdict=verdict,
                               eval_note=shipped_set_note(eval_set, job.base_dir))


def _validate_artifact(artifact: Path, job, eval_set: EvalSet, progress, timing: bool,
                       latency_runner: LatencyRunner | None = None) -> Validation:
    from . import registry, runtime
    from .base import load_tokenizer
    from .progress import begin

    step = progress or (lambda _m: None)
    profile, task = job.profile, job.task
    originals = {(e.name if job.mode == "swappable" else None): e.original for e in job.adapters}
    begin(step, f"opening the artifact in {profile.runtime}")
    session = runtime.open(artifact, threads=profile.threads, workers=1)
    try:
        if task is Task.CAUSAL_LM:
            base_session = session if job.mode == "swappable" else \
                registry.get(profile.runtime).session_class().open_base(job.base_dir, profile.threads)
            try:
                return validate_lm(artifact, session, profile, job.base_model, originals, eval_set, base_session,
                                   step, timing, latency_runner)
            finally:
                if base_session is not None and base_session is not session:
                    base_session.close()
        tokenizer = load_tokenizer(job.base_dir)
        begin(step, f"computing the fp32 PyTorch reference on {len(eval_set.texts)} eval inputs")
        references = {k: reference_outputs(job.base_model, a, task, tokenizer, eval_set.texts)
                      for k, a in originals.items()}
        base_outputs = {k: base_alone_outputs(job.base_model, a, task, tokenizer, eval_set.texts)
                        for k, a in originals.items()}
        step("computed fp32 reference")
        return validate_encoder(artifact, session, profile, task, tokenizer, eval_set, references, step, timing,
                                base_outputs, latency_runner)
    finally:
        session.close()


@dataclass(frozen=True)
class ValidateConfig:
    """The ``validate`` verb's inputs."""

    artifact: Path
    eval_path: Path | None = None  # None: the shipped eval set of the task
    allow_ungated: bool = False  # a run no budget applies to may pass (loradeploy.verdict)


def revalidate(config: ValidateConfig, progress=None) -> dict:
    """Validate an existing artifact again (a changed file of it fails first, exit 1), rebuilding the
    reference from the inputs recorded in its manifest (their sha256 must still match). Writes nothing."""
    from .adapters import ReadOptions
    from .base import load_torch_model, resolve_base
    from .fsutil import sha256_file
    from .ir import Method
    from .job import AdapterInputs, AdapterSpec, ExportJob, load_entries
    from .profile import parse_profile
    from .verify import read_unchanged

    manifest = read_unchanged(Path(config.artifact))
    data = {k: v for k, v in manifest.target.profile.items() if k != "source"}
    profile = parse_profile(Path(manifest.target.profile.get("source", "manifest.json")), data, recorded=True)
    opts = manifest.read_options
    specs = []
    for a in manifest.adapters:
        src = a.sources[0] if a.sources and isinstance(a.sources[0], dict) else {}
        path = Path(str(src.get("path", "")))
        if not path.is_file() or sha256_file(path) != src.get("sha256"):
            raise LoradeployError(f"{path}: the adapter this artifact was exported from is missing or changed")
        specs.append(AdapterSpec(a.name, path))
    inputs = AdapterInputs(tuple(specs), Method(opts["format"]) if opts.get("format") else None,
                           ReadOptions(opts.get("lora_alpha"), opts.get("lora_r"),
                                       Path(opts["head"]) if opts.get("head") else None))
    entries = load_entries(inputs)
    base_dir = resolve_base(manifest.base.spec)
    task = Task(manifest.task)
    base_model = load_torch_model(base_dir, task, manifest.num_labels)
    job = ExportJob(manifest.base.spec, base_dir, task, manifest.num_labels, entries, profile, manifest.mode,
                    base_model)
    eval_set = load_eval(config.eval_path, lm=task is Task.CAUSAL_LM)
    result = validate_artifact(Path(config.artifact), job, eval_set, progress, allow_ungated=config.allow_ungated)
    return {"artifact": str(Path(config.artifact).absolute()), "target": profile.name, "mode": manifest.mode,
            "validation": asdict(result)}
