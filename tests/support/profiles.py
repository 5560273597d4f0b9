"""Built-in profiles made quick for tests, and short eval sets."""

from __future__ import annotations

from pathlib import Path

#: what :func:`quick_profile` changes in a built-in profile: one short timing run (tests time nothing)
QUICK_TIMING = {"warmup": 0, "runs": 1, "shapes": [{"batch": 1, "seq": 16}]}


def quick_profile(folder: Path, name: str, *, latency_budget: bool = False, filename: str | None = None,
                  **overrides) -> Path:
    """The built-in profile ``name`` written to ``folder`` (as ``filename``, default
    ``<name>.yaml``) with :data:`QUICK_TIMING`, then ``overrides``, applied to its top-level
    keys (an override of ``None`` keeps the built-in's value), and without its
    ``latency_p95_ms`` budget unless ``latency_budget``."""
    import yaml

    from loradeploy.profile import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text())
    data.update({k: v for k, v in {**QUICK_TIMING, **overrides}.items() if v is not None})
    if not latency_budget:
        data["budgets"] = {k: v for k, v in (data.get("budgets") or {}).items() if k != "latency_p95_ms"}
    path = Path(folder) / (filename or f"{name}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def lm_eval_head(folder: Path, n: int) -> Path:
    """The first ``n`` of the shipped LM eval texts, as ``folder/eval.txt`` (Gemma validations
    on fewer texts: each reference and runtime pass costs seconds per text here)."""
    from loradeploy.evaldata import DEFAULT_LM_EVAL

    path = Path(folder) / "eval.txt"
    path.write_text("\n".join(DEFAULT_LM_EVAL.read_text().splitlines()[:n]) + "\n")
    return path
