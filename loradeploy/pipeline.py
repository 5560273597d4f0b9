"""Library verbs behind the CLI commands: each reads, runs stages over the IR, writes."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .adapters import ReadOptions, read_adapter
from .adapters import peft as peft_format
from .fsutil import atomic_output_dir
from .ir import Method
from .prune import PruneConfig, measure, prune
from .summary import summarize


def inspect_adapter(path: Path, method: Method | None = None,
                    options: ReadOptions | None = None, prune_config: PruneConfig | None = None) -> dict:
    """Describe the adapter at ``path`` and what exact pruning does to it."""
    adapters = read_adapter(path, method, options)
    return summarize(adapters, measure(adapters, prune_config))


def prune_adapter(path: Path, out: Path, method: Method | None = None,
                  options: ReadOptions | None = None, prune_config: PruneConfig | None = None,
                  overwrite: bool = False) -> dict:
    """Prune the adapter at ``path`` and write it to ``out`` as a PEFT LoRA folder
    (plus ``prune_report.json``). Returns the summary with the output files."""
    adapters = read_adapter(path, method, options)
    pruned, report = prune(adapters, prune_config)
    record = summarize(adapters, report)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        files = peft_format.write(pruned, tmp)
        record["output"] = {"folder": str(Path(out).absolute()),
                            "files": [f.name for f in files] + ["prune_report.json"],
                            "loradeploy_version": __version__}
        (tmp / "prune_report.json").write_text(json.dumps(
            {**record, "prune": report.to_dict()}, indent=2, default=str))
    return record


def quantize_plan(base: str, adapter_specs: list[str], target: str, out: Path, plan: str = "learned",
                  budget: str | None = None, max_bytes: int | None = None, calibration: Path | None = None,
                  method: Method | None = None, options: ReadOptions | None = None, overwrite: bool = False,
                  progress=None) -> dict:
    """Compute a precision plan for the adapters on ``base`` for ``target`` and write it to
    ``out`` (JSON; written whole, then renamed into place)."""
    import os

    from .errors import OutputError
    from .export import AdapterSpec, load_base_for, load_entries
    from .quantize import plan_for
    from .targets.profile import load_profile

    step = progress or (lambda _m: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder for the plan file")
    profile = load_profile(target)
    entries = load_entries([AdapterSpec.parse(a) for a in adapter_specs], method, options or ReadOptions())
    step("read and pruned adapters")
    base_dir, task, _, base_model = load_base_for(base, entries)
    step("loaded base model")
    result = plan_for(entries, profile.runtime, profile.name, plan, base_model, base_dir, task, budget, max_bytes,
                      calibration, step)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        result.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    record = result.to_dict()
    record["output"] = str(out.absolute())
    return record
