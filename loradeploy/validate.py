"""Validation of an artifact in its runtime against the PyTorch fp32 reference (the base with
the adapter as trained, before pruning): fidelity and task metrics on eval inputs, latency
per benchmark shape and peak RSS (measured in a fresh process holding only the runtime),
artifact bytes — each held against the target profile's budget."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LoradeployError
from .evaldata import EvalSet
from .ir import AdapterSet, Task
from .merge import merge_into
from .targets.profile import Budgets, TargetProfile

BATCH = 32
MAX_LENGTH = 128


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


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def batches(tokenizer, texts: list[str]):
    for i in range(0, len(texts), BATCH):
        yield tokenize(tokenizer, texts[i:i + BATCH])


@torch.no_grad()
def model_outputs(model, task: Task, tokenizer, texts) -> np.ndarray:
    """Logits (classifier) or mean-pooled embeddings of a PyTorch model on ``texts``."""
    outs = []
    for ids, mask in batches(tokenizer, texts):
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        if task is Task.SEQUENCE_CLASSIFICATION:
            outs.append(out.logits.numpy())
        else:
            m = torch.from_numpy(mask).unsqueeze(-1).float()
            outs.append(((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy())
    return np.concatenate(outs)


def reference_outputs(base_model, adapters: AdapterSet, task: Task, tokenizer, texts) -> np.ndarray:
    """Outputs of the base with ``adapters`` as trained, ΔW merged in float64 then fp32."""
    return model_outputs(merge_into(copy.deepcopy(base_model), adapters), task, tokenizer, texts)


def base_alone_outputs(base_model, adapters: AdapterSet, task: Task, tokenizer, texts) -> np.ndarray:
    """The fp32 base with only the adapter's extra tensors (its head): what the adapter's ΔW
    moves the outputs away from."""
    from .merge import load_extras

    model = copy.deepcopy(base_model)
    load_extras(model, adapters)
    return model_outputs(model, task, tokenizer, texts)


def adapter_effect_kept(ref: np.ndarray, got: np.ndarray, base: np.ndarray) -> float:
    """1 − ‖artifact − reference‖ / ‖reference − base alone‖ over every output: 1 when the
    artifact reproduces the adapter's effect, 0 when its error is as large as the effect
    (e.g. a small ΔW rounded away by a 4-bit base)."""
    effect = np.linalg.norm(ref.astype(np.float64) - base)
    return float(1.0 - np.linalg.norm(got.astype(np.float64) - ref) / effect) if effect > 0 else float("nan")


def runner_outputs(runner, adapter: str | None, tokenizer, texts) -> np.ndarray:
    return np.concatenate([runner.run(ids, mask, adapter) for ids, mask in batches(tokenizer, texts)])


def fidelity(ref: np.ndarray, got: np.ndarray, labels: list[int] | None, task: Task) -> dict:
    """Label agreement, |Δlogit| and accuracy (classifier) or cosine (embeddings)."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        diff = np.abs(got.astype(np.float64) - ref)
        metrics = {
            "label_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs_logit": float(diff.max()),
            "mean_abs_logit": float(diff.mean()),
            "max_abs_logit_per_class": diff.max(0).tolist(),
            "reference_spread": float(ref.std()),  # scale of the noise floor in `check`
        }
        if labels is not None:
            y = np.asarray(labels)
            metrics["accuracy_reference"] = float((ref.argmax(-1) == y).mean())
            metrics["accuracy"] = float((got.argmax(-1) == y).mean())
            metrics["accuracy_drop"] = metrics["accuracy_reference"] - metrics["accuracy"]
        return metrics
    num = (ref * got).sum(-1)
    cos = num / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-12)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "reference_spread": float(ref.std())}


def fidelity_checks(adapter: str, m: dict, b: Budgets) -> list[Check]:
    table = [("label_agreement", b.label_agreement_min, ">="), ("max_abs_logit", b.max_abs_logit_max, "<="),
             ("mean_abs_logit", b.mean_abs_logit_max, "<="), ("accuracy_drop", b.accuracy_drop_max, "<="),
             ("accuracy", None, ">="), ("cosine_min", b.cosine_min, ">="), ("adapter_effect_kept", None, ">=")]
    return [Check(adapter, k, m[k], budget, d) for k, budget, d in table if k in m]


def measure_latency(artifact: Path, runtime: str, adapter: str | None, profile: TargetProfile) -> dict:
    """Latency per shape and peak RSS, measured by ``loradeploy.latency`` in a fresh process."""
    cmd = [sys.executable, "-m", "loradeploy.latency", str(artifact), "--runtime", runtime,
           "--warmup", str(profile.warmup), "--runs", str(profile.runs), "--threads", str(profile.threads)]
    cmd += [a for s in profile.shapes for a in ("--shape", f"{s.batch}x{s.seq}")]
    if adapter:
        cmd += ["--adapter", adapter]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
               and p.name not in ("manifest.json", "report.html"))


def validate(artifact: Path, runner, runtime: str, profile: TargetProfile, task: Task, tokenizer,
             eval_set: EvalSet, references: dict[str | None, np.ndarray], progress=None,
             timing: bool = True, base_outputs: dict[str | None, np.ndarray] | None = None) -> dict:
    """Run every adapter (``None`` for a merged artifact) on the eval set, compare with its
    reference, measure latency with the first adapter active, and judge against budgets."""
    checks, metrics = [], {}
    for adapter, ref in references.items():
        label = adapter or "merged"
        got = runner_outputs(runner, adapter, tokenizer, eval_set.texts)
        metrics[label] = fidelity(ref, got, eval_set.labels, task)
        if base_outputs and adapter in base_outputs:
            metrics[label]["adapter_effect_kept"] = adapter_effect_kept(ref, got, base_outputs[adapter])
        checks += fidelity_checks(label, metrics[label], profile.budgets)
        if progress:
            progress(f"fidelity {label}")
    first = next(iter(references))
    latency = measure_latency(artifact, runtime, first, profile) if timing else {"shapes": {}}
    if timing:
        checks += latency_checks(first or "merged", latency, profile.budgets)
    size = artifact_bytes(artifact)
    mb_budget = profile.budgets.artifact_mb_max
    checks.append(Check("artifact", "artifact_mb", size / 2**20, mb_budget, "<="))
    return {
        "eval_file": str(eval_set.path),
        "eval_inputs": len(eval_set.texts),
        "metrics": metrics,
        "latency": latency,
        "artifact_bytes": size,
        "checks": [c.to_dict() for c in checks],
        "passed": all(c.status != "FAIL" for c in checks),
    }


# --- causal language models (llama.cpp target) ---------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def lm_fidelity(pairs: list[tuple[np.ndarray, np.ndarray, list[int]]]) -> dict:
    """Per-token KL(reference ‖ artifact) and top-1 agreement over every position, and the
    perplexity of each on the next tokens (as ``llama-perplexity --kl-divergence`` reports)."""
    kls, top1, nll_ref, nll_art = [], [], [], []
    for ref, art, tokens in pairs:
        p, q = _log_softmax(ref), _log_softmax(art)
        kls.append((np.exp(p) * (p - q)).sum(-1))
        top1.append(ref.argmax(-1) == art.argmax(-1))
        nxt = np.asarray(tokens[1:])
        nll_ref.append(-p[np.arange(len(nxt)), nxt])
        nll_art.append(-q[np.arange(len(nxt)), nxt])
    kl = np.concatenate(kls)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(np.concatenate(top1).mean()),
            "ppl_reference": float(np.exp(np.concatenate(nll_ref).mean())),
            "ppl_artifact": float(np.exp(np.concatenate(nll_art).mean())), "tokens": int(kl.size)}


@torch.no_grad()
def lm_reference(model, token_lists: list[list[int]]) -> list[np.ndarray]:
    return [model(torch.tensor([t])).logits[0].float().numpy() for t in token_lists]


def lm_checks(label: str, m: dict, b: Budgets) -> list[Check]:
    return [Check(label, "kl_mean", m["kl_mean"], b.kl_mean_max, "<="),
            Check(label, "top1_agreement", m["top1_agreement"], b.top1_agreement_min, ">="),
            Check(label, "ppl_reference", m["ppl_reference"], None, "<="),
            Check(label, "ppl_artifact", m["ppl_artifact"], None, "<=")]


def validate_lm(artifact: Path, runner, runtime: str, profile: TargetProfile, base_model,
                adapters: dict[str | None, AdapterSet], eval_set: EvalSet, base_runner=None, progress=None,
                timing: bool = True) -> dict:
    """LM validation: every adapter (``None``: merged artifact) against its PyTorch reference;
    the base alone measured the same way (``base_runner`` with no adapter vs the PyTorch base)
    tells how much of the gap is the quantized base's; then throughput and switch times."""
    tokens = [runner.tokenize(t) for t in eval_set.texts]
    checks, metrics = [], {}
    for adapter, original in adapters.items():
        label = adapter or "merged"
        ref = lm_reference(merge_into(copy.deepcopy(base_model), original), tokens)
        metrics[label] = lm_fidelity([(r, runner.logits(t, adapter), t) for r, t in zip(ref, tokens)])
        checks += lm_checks(label, metrics[label], profile.budgets)
        if progress:
            progress(f"fidelity {label}")
    if base_runner is not None:
        ref = lm_reference(base_model, tokens)
        base = metrics["base alone"] = lm_fidelity([(r, base_runner.logits(t, None), t) for r, t in zip(ref, tokens)])
        checks += lm_checks("base alone", base, Budgets())
        for adapter in adapters:
            m = metrics[adapter or "merged"]
            m["kl_excess_vs_base"] = m["kl_mean"] - base["kl_mean"]
            m["top1_drop_vs_base"] = base["top1_agreement"] - m["top1_agreement"]
            checks += [Check(adapter or "merged", "kl_excess_vs_base", m["kl_excess_vs_base"],
                             profile.budgets.kl_excess_vs_base_max, "<="),
                       Check(adapter or "merged", "top1_drop_vs_base", m["top1_drop_vs_base"],
                             profile.budgets.top1_drop_vs_base_max, "<=")]
    first = next(iter(adapters))
    latency = measure_latency(artifact, runtime, first, profile) if timing else {"shapes": {}}
    if timing:
        checks += latency_checks(first or "merged", latency, profile.budgets)
    for key, value in latency.get("llama", {}).items():
        checks.append(Check(first or "merged", key, value, None, "<="))
    size = artifact_bytes(artifact)
    checks.append(Check("artifact", "artifact_mb", size / 2**20, profile.budgets.artifact_mb_max, "<="))
    return {"eval_file": str(eval_set.path), "eval_inputs": len(eval_set.texts), "metrics": metrics,
            "latency": latency, "artifact_bytes": size, "checks": [c.to_dict() for c in checks],
            "passed": all(c.status != "FAIL" for c in checks)}
