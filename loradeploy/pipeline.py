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
