"""The verdict of a validation, one rule for every verb that validates (``export``, ``validate``,
``check``, fleets):

* **FAIL** when a measure is outside its budget;
* **UNGATED** — not a PASS — when a validated adapter (or the merged artifact) has no fidelity
  measure with a budget: the profile gates nothing the artifact computes, so "PASS" would promise
  what nobody checked. It passes only when allowed: ``allow_ungated: true`` in the profile, or the
  caller's ``--allow-ungated``; the verdict then says it is ungated;
* **PASS** otherwise.

Which measures a validation reports for a task, and which of them a profile bounds, come from the
one table of measures (:mod:`loradeploy.measures`)."""

from __future__ import annotations

from . import measures

PASS, FAIL, UNGATED = "PASS", "FAIL", "UNGATED"
NOTHING_GATED = "no budget applies — nothing gated"


def gated_measures(budgets: dict, task: str) -> list[str]:
    """The fidelity measures of ``task`` that every validation reports and ``budgets`` (a
    profile's budgets as a mapping) bound: what gates any run of that task on the profile."""
    return [m.name for m in measures.MEASURES.values()
            if task in m.tasks and m.when is None and m.budget and budgets.get(m.budget) is not None]


def judge(checks: list[dict], labels: list[str], task: str, allowed_by: str | None = None) -> tuple[bool, str]:
    """(passed, the one-line verdict) of validation ``checks`` (rows with ``adapter``,
    ``measure``, ``budget``, ``status``) for the validated ``labels`` (adapter names, or
    "merged"). ``allowed_by``: what allows an ungated run (None: nothing does)."""
    failed = [f"{c['adapter']} {c['measure']}" for c in checks if c["status"] == "FAIL"]
    if failed:
        return False, f"{FAIL}: outside its budget: {', '.join(failed)}"
    fidelity = {c["adapter"] for c in checks if c["budget"] is not None and c["measure"] in measures.MEASURES}
    ungated = [label for label in labels if label not in fidelity]
    if not ungated:
        return True, PASS
    if any(c["budget"] is not None for c in checks) or len(ungated) < len(labels):
        what = f"no fidelity budget applies to {', '.join(ungated)} — not gated"
    else:
        what = NOTHING_GATED
    if allowed_by:
        return True, f"{PASS} (ungated: {what}; allowed by {allowed_by})"
    keys = [m.budget for m in measures.MEASURES.values() if task in m.tasks and m.budget and m.when is None]
    return False, (f"{UNGATED}: {what} (a {task} run is gated by any of the budgets {', '.join(keys)} in the "
                   "profile; or allow it: allow_ungated: true in the profile, or --allow-ungated)")


def is_ungated(validation: dict) -> bool:
    """Whether a validation record (as JSON data) failed only because nothing was gated."""
    return str(validation.get("verdict") or "").startswith(UNGATED)
