"""The one table of fidelity measures: name, which direction is better, the profile budget that
bounds it, the tasks that report it, and its unit — used by validation (checks against
budgets), ``check`` (regression against a baseline) and the plan search; and the formulas of the
classifier and embeddings measures (:func:`logit_errors`, :func:`cosines`), which validation and
the plan search both compute.

A change between two runs is float noise, not a regression, while it stays under the
measure's *noise floor* (:func:`noise_floor`), which is tied to the measure's own scale:

* ``fraction`` measures (agreement, accuracy, top-1): one input (or token) of the eval set,
  ``1 / n`` — float noise of another CPU's kernels can flip an input that sits on a decision
  boundary, and no smaller change can be seen;
* ``logit`` measures (|Δlogit|): 2% of the profile's budget for the measure (else of its other
  |Δlogit| budget), else 0.1% of the spread (standard deviation) of the fp32 reference outputs
  on the eval set;
* ``kl`` measures: 2% of the measure's budget, else of the profile's ``kl_mean_max``;
* ``cosine`` measures: 2% of the budget's distance from 1 (``1 − cosine_min``);
* ``ratio`` measures (perplexity ratio): 2% of the budget's distance from 1.

Without a scale (an old manifest without the spread) the floor is :data:`MIN_FLOOR`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: share of a measure's budget (or scale) under which a change is noise
BUDGET_SHARE = 0.02
#: share of the fp32 reference outputs' spread under which a |Δlogit| change is noise
SPREAD_SHARE = 1e-3
MIN_FLOOR = 1e-6

CLASSIFIER, EMBEDDINGS, LM = "sequence-classification", "feature-extraction", "causal-lm"


@dataclass(frozen=True)
class Measure:
    name: str
    higher_is_better: bool
    budget: str | None  # the Budgets field that bounds it (None: reported, not budgeted)
    unit: str  # fraction | logit | kl | cosine | ratio | info
    tasks: tuple[str, ...]
    help: str
    when: str | None = None  # None: every validation of its tasks reports it; else when it is reported

    @property
    def direction(self) -> str:
        """The comparison a value must pass against its budget: ``>=`` or ``<=``."""
        return ">=" if self.higher_is_better else "<="


MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("label_agreement", True, "label_agreement_min", "fraction", (CLASSIFIER,),
            "share of eval inputs where the artifact picks the fp32 reference's label"),
    Measure("max_abs_logit", False, "max_abs_logit_max", "logit", (CLASSIFIER,),
            "largest |artifact logit − reference logit| over the eval set"),
    Measure("mean_abs_logit", False, "mean_abs_logit_max", "logit", (CLASSIFIER,),
            "mean |artifact logit − reference logit|"),
    Measure("accuracy", True, None, "fraction", (CLASSIFIER,), "task accuracy of the artifact on the eval labels",
            "the eval set has labels"),
    Measure("accuracy_drop", False, "accuracy_drop_max", "fraction", (CLASSIFIER,),
            "reference accuracy minus the artifact's", "the eval set has labels"),
    Measure("adapter_effect_kept", True, "adapter_effect_kept_min", "fraction", (CLASSIFIER, LM),
            "1 − ‖artifact − reference‖ / ‖reference − base alone‖ (LMs: 1 − KL(reference ‖ artifact) / "
            "KL(reference ‖ base alone), per token), the base alone in fp32: how much of the adapter's effect "
            "survives; above 0 the artifact is closer to the adapter's reference than the base alone is"),
    Measure("cosine_min", True, "cosine_min", "cosine", (EMBEDDINGS,),
            "smallest cosine similarity between artifact and reference embeddings"),
    Measure("cosine_mean", True, None, "cosine", (EMBEDDINGS,), "mean cosine similarity to the reference"),
    Measure("cosine_distance", False, None, "cosine", (EMBEDDINGS,),
            "1 − mean cosine similarity (the measure an embeddings plan is held to)"),
    Measure("kl_mean", False, "kl_mean_max", "kl", (LM,), "mean per-token KL(reference ‖ artifact), nats"),
    Measure("kl_p99", False, None, "kl", (LM,), "99th percentile of the per-token KL"),
    Measure("top1_agreement", True, "top1_agreement_min", "fraction", (LM,),
            "share of tokens where the artifact's most likely next token is the reference's"),
    Measure("kl_excess_vs_base", False, "kl_excess_vs_base_max", "kl", (LM,),
            "the adapter's mean KL minus the base alone's in the same runtime (the adapter's own share)",
            "the runtime runs the base alone (swappable, or a GGUF base)"),
    Measure("top1_drop_vs_base", False, "top1_drop_vs_base_max", "fraction", (LM,),
            "the base alone's top-1 agreement minus the adapter's",
            "the runtime runs the base alone (swappable, or a GGUF base)"),
    Measure("greedy_match", True, "greedy_match_min", "fraction", (LM,),
            "share of eval prompts whose first 32 greedy tokens equal the fp32 reference's (runtimes that generate)",
            "its budget is set (the runtime must generate)"),
    Measure("ppl_reference", False, None, "info", (LM,), "perplexity of the fp32 reference on the eval text"),
    Measure("ppl_artifact", False, None, "info", (LM,), "perplexity of the artifact on the eval text"),
    Measure("ppl_ratio", False, "ppl_ratio_max", "ratio", (LM,),
            "perplexity of the artifact over the fp32 reference's on the eval text"),
)}

#: measures a baseline comparison holds to a direction (``info`` ones are only shown)
COMPARED = tuple(name for name, m in MEASURES.items() if m.unit != "info")


def get(name: str) -> Measure:
    """The measure ``name``; raises KeyError naming the known ones."""
    try:
        return MEASURES[name]
    except KeyError:
        raise KeyError(f"unknown measure {name!r} (known: {', '.join(MEASURES)})") from None


def noise_floor(name: str, budgets: dict, resolution: int | None = None, spread: float | None = None) -> float:
    """The absolute change of measure ``name`` that is float noise (see the module doc).
    ``budgets``: the profile's budgets as a mapping; ``resolution``: eval inputs (or tokens)
    behind a fraction; ``spread``: standard deviation of the fp32 reference outputs."""
    m = get(name)
    own = budgets.get(m.budget) if m.budget else None
    if m.unit == "fraction":
        return 1.0 / resolution if resolution else MIN_FLOOR
    if m.unit == "logit":
        scale = own if own is not None else next(
            (budgets[o.budget] for o in MEASURES.values() if o.unit == "logit" and budgets.get(o.budget) is not None),
            None)
        if scale is not None:
            return max(BUDGET_SHARE * scale, MIN_FLOOR)
        return max(SPREAD_SHARE * spread, MIN_FLOOR) if spread else MIN_FLOOR
    if m.unit == "kl":
        scale = own if own is not None else budgets.get("kl_mean_max")
        return max(BUDGET_SHARE * scale, MIN_FLOOR) if scale is not None else MIN_FLOOR
    if m.unit in ("cosine", "ratio"):
        return max(BUDGET_SHARE * abs(1.0 - own), MIN_FLOOR) if own is not None else MIN_FLOOR
    return 0.0


#: what the speed and size rows of a validation mean (not fidelity: not compared by ``check``)
RUNTIME_HELP = {
    "latency_p50_ms": "median time of one call at this batch × sequence shape, in a fresh process holding only the runtime",
    "latency_p95_ms": "95th percentile of that time",
    "peak_rss_mb": "peak resident memory of that fresh process (the runtime, the artifact and its inputs)",
    "artifact_mb": "size of the artifact folder",
    "tokens_per_s": "prompt processing speed: tokens of an N-token prompt per second, the adapter active",
    "tokens_per_s_base": "the same with no adapter active (the base alone)",
    "tg_tokens_per_s": "generation speed: tokens generated per second, one at a time with the KV cache, the adapter active",
    "tg_tokens_per_s_base": "the same with no adapter active",
    "adapter_load_ms": "time to load the adapter file into the running session",
    "adapter_switch_ms": "time to switch the active adapter between two calls",
    "model_reload_ms": "time to load the base model again (what a switch saves)",
    "reload_over_switch": "model reload time divided by adapter switch time",
}


def describe(name: str) -> str | None:
    """What a validation row named ``name`` measures (its ``[shape]`` suffix and a ``ppN_``
    prompt-length prefix stripped); None for an unknown name."""
    import re

    base = re.sub(r"\[.*\]$", "", name)
    if base in MEASURES:
        return MEASURES[base].help
    if base in RUNTIME_HELP:
        return RUNTIME_HELP[base]
    prompt = re.match(r"pp(\d+)_(tokens_per_s(_base)?)$", base)
    if prompt:
        return RUNTIME_HELP[prompt.group(2)].replace("an N-token", f"a {prompt.group(1)}-token")
    return None


# --- the formulas (numpy arrays or torch tensors: each computes in its own dtype) -------------

def logit_errors(ref, got) -> dict:
    """Label agreement and |Δlogit| of classifier logits ``got`` against ``ref`` (rows: inputs):
    ``label_agreement``, ``max_abs_logit``, ``mean_abs_logit``."""
    diff = abs(got - ref)
    return {"label_agreement": float((got.argmax(-1) == ref.argmax(-1)).sum()) / len(ref),
            "max_abs_logit": float(diff.max()), "mean_abs_logit": float(diff.mean())}


def cosines(ref, got):
    """Cosine similarity of each row of ``got`` with the same row of ``ref`` (embeddings)."""
    norms = ((ref * ref).sum(-1) ** 0.5) * ((got * got).sum(-1) ** 0.5)
    return (ref * got).sum(-1) / (norms + 1e-12)


def adapter_effect_kept(ref, got, base) -> float:
    """1 − ‖artifact − reference‖ / ‖reference − base alone‖ over every output: 1 when the
    artifact reproduces the adapter's effect, 0 when its error is as large as the effect
    (e.g. a small ΔW rounded away by a 4-bit base)."""
    effect = np.linalg.norm(ref.astype(np.float64) - base)
    return float(1.0 - np.linalg.norm(got.astype(np.float64) - ref) / effect) if effect > 0 else float("nan")
