"""The plan search: per-tensor sensitivity on calibration inputs, a greedy order of
precision drops by sensitivity per byte saved, and an end-to-end check of whole plans that
backs off (binary search over the greedy order) until the plan meets the fidelity budget.

Plans are simulated and measured by :class:`~loradeploy.quant.evaluator.Evaluator`; the order
that also lowers ranks is :class:`~loradeploy.quant.joint_order.JointOrder`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..errors import LoradeployError
from ..ir import Task
from ..progress import Progress
from .evaluator import Evaluator
from .joint_order import JointOrder, additive, from_additive, module_gain, tensor_bytes
from .plan import ROLES, allowed_formats, tensor_key
from .rounding import ROUNDED_FORMATS

#: the measure a plan is held to, per task (names from the one table of measures)
MEASURES = {Task.SEQUENCE_CLASSIFICATION: "mean_abs_logit", Task.FEATURE_EXTRACTION: "cosine_distance",
            Task.CAUSAL_LM: "kl_mean"}
#: default fidelity budget of the adapter's quantization alone (the target's budget covers the
#: whole artifact, base quantization and runtime included)
DEFAULT_BUDGETS = {"mean_abs_logit": 0.01, "cosine_distance": 1e-4, "kl_mean": 0.002}
#: further constraints a plan is held to by default (measure → minimum), per task: a language
#: model's top-1 token may flip at near-ties even when KL is tiny, and the targets budget top-1
DEFAULT_FLOORS = {Task.CAUSAL_LM: {"top1_agreement": 0.98}, Task.SEQUENCE_CLASSIFICATION: {"label_agreement": 0.995}}



@dataclass
class SearchResult:
    formats: dict[str, str]
    measured: dict
    nbytes: int
    sensitivity: dict[str, dict[str, float]]
    tensor_bytes: dict[str, dict[str, int]]
    curve: list[dict] = field(default_factory=list)  # whole plans checked end to end
    predicted: float = 0.0
    start: dict | None = None  # B-LoRA's learned bit widths as a plan, measured
    chosen_from: str = "search"
    ranks: dict[str, int] | None = None  # modules the plan truncates (SVD) → their rank
    rounding: str = "nearest"  # how integer codes are chosen: "output-aware" or "nearest"
    uniform: list[dict] = field(default_factory=list)  # each uniform level as a whole plan, measured
    continued: dict | None = None  # moves measured one by one past the back-off: {"measured", "kept"}
    held_out: dict | None = None  # the plan measured on held-out texts (see :func:`_hold_out`)


def _model_sensitivity(ev, ladders, top, base_err, measure, step) -> dict[str, dict[str, float]]:
    """Every tensor at every lower format alone, measured on the model's outputs (one forward
    pass each: exact, slow for large models)."""
    sens = {}
    for i, (key, ladder) in enumerate(sorted(ladders.items())):
        sens[key] = {ladder[0]: 0.0}
        for fmt in ladder[1:]:
            sens[key][fmt] = max(additive(measure, ev.error({**top, key: fmt})[measure]) - additive(measure, base_err), 0.0)
        if i % 8 == 7:
            step(f"sensitivity {i + 1}/{len(ladders)} tensors")
    return sens


def _layer_sensitivity(ev, ladders, top, base_err, measure, step) -> dict[str, dict[str, float]]:
    """Each module's output error on its calibration inputs per format, converted to the model's
    output measure by one forward pass per module (both its tensors at their lowest format):
    sensitivity = gain_m · layer_error², in the additive form of the measure."""
    p = 2
    top_fmt = ev.storage.ladder[0]
    sens = {}
    for i, name in enumerate(sorted(ev.adapters.modules)):
        ka, kb = tensor_key(name, "lora_A"), tensor_key(name, "lora_B")
        low_a, low_b = ladders[ka][-1], ladders[kb][-1]
        gain = module_gain(ev, name, {**top, ka: low_a, kb: low_b}, measure, base_err)
        sens[ka] = {f: gain * ev.layer_error(name, f, top_fmt) ** p for f in ladders[ka]}
        sens[kb] = {f: gain * ev.layer_error(name, top_fmt, f) ** p for f in ladders[kb]}
        if i % 8 == 7:
            step(f"sensitivity {i + 1}/{len(ev.adapters.modules)} modules")
    return sens


def search(ev: Evaluator, budget: float | None = None, max_bytes: int | None = None,
           start: dict[str, str] | None = None, progress: Progress | None = None,
           sensitivity: str = "layer", floors: dict[str, float] | None = None, ranks: bool = False,
           holdout: Evaluator | None = None) -> SearchResult:
    """Minimise bytes with ``measure ≤ budget`` (or minimise error with ``bytes ≤ max_bytes``).
    ``sensitivity``: ``layer`` (module output error, scaled to the model's by one forward pass
    per module) or ``model`` (one forward pass per tensor and format). ``ranks``: also lower
    modules' ranks (SVD truncation, :mod:`loradeploy.quant.rank`), chosen jointly with the
    formats by the same measured error per byte saved. ``holdout``: an evaluator on texts the
    search does not see (``codes_from=ev``); with a budget, the plan must also hold on them
    (:func:`_hold_out`), else the search backs off along the plans it accepted; with
    ``max_bytes``, the plans within the bytes (the search's and the whole-plan candidates) are
    compared on them, and the one with the least error there is kept."""
    step = progress or (lambda _m: None)
    measure = MEASURES[ev.task]
    ladders = {tensor_key(n, r): allowed_formats(m, r, ev.storage) for n, m in ev.adapters.modules.items() for r in ROLES}
    top = {k: lad[0] for k, lad in ladders.items()}
    base_err = ev.error(top)[measure]
    order = None
    if ranks:
        order = JointOrder(ev, ladders, top, base_err, measure, step)
        sens, nbytes, plans = order.sens, order.nbytes, order.plans()
    else:
        sens = (_model_sensitivity if sensitivity == "model" else _layer_sensitivity)(ev, ladders, top, base_err, measure, step)
        nbytes = {key: {f: tensor_bytes(ev, key, f) for f in ladder} for key, ladder in ladders.items()}
        plans = _format_order(ladders, top, sens, nbytes, measure)
    bytes_at = [p[2] for p in plans]
    curve: list[dict] = []

    def plan_at(n: int) -> dict[str, str]:
        return plans[n][0]

    def ranks_at(n: int) -> dict[str, int] | None:
        return plans[n][1] or None

    def check(n: int) -> dict:
        got = ev.error(plan_at(n), ranks_at(n))
        curve.append({"moves": n, "bytes": bytes_at[n], **got, "predicted": plans[n][3]})
        step(f"checked a plan of {bytes_at[n]:,} bytes: {measure} {got[measure]:.4g}")
        return got

    floors = DEFAULT_FLOORS.get(ev.task, {}) if floors is None else floors

    def meets(got: dict) -> bool:
        return got[measure] <= budget and all(got.get(k, v) >= v for k, v in floors.items())

    if max_bytes is not None:
        n = next((i for i, b in enumerate(bytes_at) if b <= max_bytes), None)
        if n is None:
            raise LoradeployError(f"no plan fits in {max_bytes:,} bytes (the smallest is {bytes_at[-1]:,})")
        measured = check(n)
    else:
        lo, hi = 0, len(plans) - 1
        first = check(0)
        if not meets(first):
            raise LoradeployError(f"even the highest precision misses the budget: {measure} {first[measure]:.4g} > {budget}")
        measured_at = {0: first}
        while lo < hi:  # largest prefix whose whole plan meets the budget
            mid = (lo + hi + 1) // 2
            measured_at[mid] = check(mid)
            if meets(measured_at[mid]):
                lo = mid
            else:
                hi = mid - 1
        n, measured = lo, measured_at[lo]
    rounding_of = {True: "output-aware", False: "nearest"}
    result = SearchResult(plan_at(n), measured, bytes_at[n], sens, nbytes, curve, plans[n][3], ranks=ranks_at(n),
                          rounding=rounding_of[ev.rounding])
    # the plans accepted on the way, fewer bytes last: (formats, ranks, bytes, calibration measures or None)
    path = [(plan_at(i), ranks_at(i), bytes_at[i], None) for i in range(n)] + [(result.formats, result.ranks,
                                                                                result.nbytes, result.measured)]
    if max_bytes is None and order is not None and n + 1 < len(plans):
        _continue_past(ev, order, plans, n, result, meets, measure, step, path)
    on_held_out = None
    if holdout is not None:
        on_held_out = _hold_out(ev, holdout, path, result, budget if max_bytes is None else None, floors, measure, step)
    # whole plans outside the greedy order, measured the same way: B-LoRA's bit hints (the
    # starting plan) and each uniform level, with the evaluator's rounding and (when that is
    # output-aware) with nearest rounding too (the additive model can misjudge how errors of many
    # tensors combine, and output-aware rounding can lose to nearest where a tensor's error is
    # already at noise level; these keep the result no worse than any of them at its bytes)
    candidates = []
    if start is not None:
        candidates.append(("blora-bit-hints", dict(start), ev.rounding))
    for rounded in sorted({ev.rounding, False}, reverse=True):
        for level, fmt in enumerate(ev.storage.ladder):
            label = f"uniform {fmt}" + (", output-aware rounding" if rounded and fmt in ROUNDED_FORMATS else "")
            if rounded != ev.rounding and fmt not in ROUNDED_FORMATS:
                continue  # the same plan as with the evaluator's rounding
            candidates.append((label, {k: lad[min(level, len(lad) - 1)] if fmt not in lad else fmt
                                       for k, lad in ladders.items()}, rounded))
    for label, formats, rounded in candidates:
        got = ev.error(formats, rounding=rounded)
        size = sum(nbytes[k][f] for k, f in formats.items())
        if label == "blora-bit-hints":
            result.start = {"formats": formats, "bytes": size, **got}
        else:
            result.uniform.append({"plan": label, "bytes": size, **got})
        fits = meets(got) if max_bytes is None else size <= max_bytes
        better = (size, got[measure]) < (result.nbytes, result.measured[measure]) if max_bytes is None \
            else (got[measure], size) < (result.measured[measure], result.nbytes)
        if fits and on_held_out is not None and max_bytes is not None:
            # within the bytes, the plans are compared on the held-out texts: the calibration texts'
            # error is what the search (and output-aware rounding) fitted, the held-out error is not
            on_holdout = on_held_out(label, formats, None, size, rounded)
            better = (on_holdout[measure], size) < (result.held_out["measured"][measure], result.nbytes)
            if better:
                result.held_out["measured"] = on_holdout
        elif fits and better and on_held_out is not None:
            on_holdout = on_held_out(label, formats, None, size, rounded)
            fits = on_holdout["holds"]
            if fits:
                result.held_out["measured"] = on_holdout
        if fits and better:
            result.formats, result.measured, result.nbytes, result.chosen_from = formats, got, size, label
            result.ranks, result.rounding = None, rounding_of[rounded]
    if not any(f in ROUNDED_FORMATS for f in result.formats.values()):
        result.rounding = "nearest"  # no integer format it applies to (e.g. llama.cpp's block types)
    return result


def _format_order(ladders, top, sens, nbytes, measure) -> list[tuple[dict, dict, int, float]]:
    """Whole plans along the greedy order of format drops (one tensor by one level, cheapest
    error per byte saved first): (formats, ranks {}, bytes, predicted measure) per prefix."""
    level = {k: 0 for k in ladders}
    heap = []

    def push(key):
        i = level[key]
        lad = ladders[key]
        if i + 1 < len(lad):
            d_err = sens[key][lad[i + 1]] - sens[key][lad[i]]
            d_bytes = nbytes[key][lad[i]] - nbytes[key][lad[i + 1]]
            heapq.heappush(heap, (max(d_err, 0.0) / max(d_bytes, 1), key, i + 1))

    for k in sorted(ladders):
        push(k)
    formats = dict(top)
    plans = [(dict(formats), {}, sum(nbytes[k][f] for k, f in formats.items()),
              from_additive(measure, sum(sens[k][f] for k, f in formats.items())))]
    while heap:
        _, key, nxt = heapq.heappop(heap)
        level[key] = nxt
        formats[key] = ladders[key][nxt]
        plans.append((dict(formats), {}, sum(nbytes[k][f] for k, f in formats.items()),
                      from_additive(measure, sum(sens[k][f] for k, f in formats.items()))))
        push(key)
    return plans


#: whole plans the continuation past the back-off may measure, per task (:func:`_continue_past`;
#: MiniLM sora converges in ~90). None for language models: their calibration set is a few
#: hundred tokens, and moves picked one by one on it spent the whole KL budget there (sora-gemma:
#: 0.00198 of 0.002, 36% fewer bytes), which on the eval set in llama.cpp (Q4_K_M base) was a KL
#: of 0.0066 from the fp32 reference against the fp16 adapter's 0.0043: over the budget. The
#: back-off alone keeps its margin (1.6e-4)
CONTINUE_EVALUATIONS = {Task.SEQUENCE_CLASSIFICATION: 96, Task.FEATURE_EXTRACTION: 96, Task.CAUSAL_LM: 0}


#: a plan holds on held-out texts when its error there is at most this × the budget (and the
#: floors hold): calibration texts are what the search fits, so its error on them understates
#: the error on other texts (measured, MiniLM adapters: 1.2-1.5× on the eval set), and a plan
#: that flips a text the calibration set lacks shows far above it (B-LoRA: 1.9×)
HOLDOUT_SLACK = 1.5
#: held-out texts per task (taken after the calibration texts, from the same source)
HOLDOUT_TEXTS = {Task.CAUSAL_LM: 8}
HOLDOUT_DEFAULT = 512


def _hold_out(ev, holdout, path, result, budget, floors, measure, step):
    """Measure the plan the search reached on ``holdout``'s texts. With a ``budget``: when it
    does not hold there (:data:`HOLDOUT_SLACK`), back off along ``path`` (the plans accepted,
    highest precision first; binary search, as held-out error grows along it) to the last that
    holds, and measure that one on the calibration texts again. Returns the function that
    measures a whole plan there, for the plans outside ``path``: with a budget they must hold
    there too; without (a byte limit), the one with the least error there is kept."""
    checked = []

    def measure_on_holdout(label, formats, ranks, size, rounding=None) -> dict:
        got = holdout.error(formats, ranks, rounding)
        ok = budget is None or (got[measure] <= HOLDOUT_SLACK * budget
                                and all(got.get(k, v) >= v for k, v in floors.items()))
        checked.append({"plan": label, "bytes": size, "holds": ok, **got})
        step(f"held-out texts: {label} plan of {size:,} bytes: {measure} {got[measure]:.4g}"
             + ("" if ok else f" > {HOLDOUT_SLACK} × the budget"))
        return {"holds": ok, **got}

    last = len(path) - 1
    got = measure_on_holdout("search", path[last][0], path[last][1], path[last][2])
    record = {"texts": sum(len(b["input_ids"]) for b in holdout.batches), "slack": HOLDOUT_SLACK,
              "measured": got, "checked": checked, "backed_off_from": None,
              "role": "budget" if budget is not None else "selection"}
    result.held_out = record
    if budget is None:
        return measure_on_holdout
    if not got["holds"]:
        lo, hi, found = 0, last - 1, {}
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found[mid] = measure_on_holdout("search, backed off", *path[mid][:3])
            if found[mid]["holds"]:
                lo = mid
            else:
                hi = mid - 1
        if lo not in found:
            found[lo] = measure_on_holdout("search, backed off", *path[lo][:3])
        formats, ranks, size, measured = path[lo]
        record.update(measured=found[lo], backed_off_from=path[last][2])
        result.formats, result.ranks, result.nbytes = formats, ranks, size
        result.measured = measured if measured is not None else ev.error(formats, ranks)
        step(f"backed off to {size:,} bytes to hold on the held-out texts: {measure} "
             f"{found[lo][measure]:.4g} there, {result.measured[measure]:.4g} on the calibration texts")

    return measure_on_holdout


def _continue_past(ev, order: JointOrder, plans, n, result, meets, measure, step, path: list) -> None:
    """Past the prefix the binary search kept, each later move measured on its own: a move that
    keeps the plan within the budget is taken; one that does not is banned, and the later moves
    of its module (which build on it) are skipped. Then the order is rebuilt from the plan
    reached, each module's best move not banned first, and gone through again, until a pass
    takes nothing or the task's ``CONTINUE_EVALUATIONS`` plans were measured. The order's error
    model misjudges some modules more than others (errors of several modules add up or cancel);
    this keeps the cheap moves that come after an expensive one."""
    state, size = order.state_of(plans[n]), plans[n][2]
    banned: set = set()
    tried = taken = 0
    cap = CONTINUE_EVALUATIONS.get(ev.task, 0)
    todo = plans[n + 1:]
    while todo and tried < cap:
        skipped, before_pass = set(), taken
        for plan in todo:
            name, frm, to = plan[4]
            if name in skipped or state[name] != frm:
                continue
            if tried >= cap:
                break
            cand = {**state, name: to}
            formats, rank_of = order.plan_of(cand)
            got = ev.error(formats, rank_of or None)
            tried += 1
            cand_size = size - order.size(name, frm) + order.size(name, to)
            result.curve.append({"moves": f"+{tried}", "bytes": cand_size, **got, "predicted": None})
            if meets(got):
                state, size, taken = cand, cand_size, taken + 1
                result.formats, result.ranks, result.nbytes, result.measured = formats, rank_of or None, size, got
                path.append((formats, rank_of or None, size, got))
            else:
                banned.add(plan[4])
                skipped.add(name)
        if taken == before_pass:
            break
        todo = order.plans(state, banned)[1:]
    if not tried:
        return
    result.continued = {"measured": tried, "kept": taken}
    step(f"continued past the back-off: {taken} of {tried} measured moves kept, {result.nbytes:,} bytes: "
         f"{measure} {result.measured[measure]:.4g}")
