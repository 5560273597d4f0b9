"""What ``inspect`` reports about an adapter: format, modules, ranks before → after pruning."""

from __future__ import annotations

import re

from .ir import AdapterSet
from .prune import PruneReport


def layer_order(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def summarize(adapters: AdapterSet, report: PruneReport) -> dict:
    """A JSON-ready description of ``adapters`` and what pruning it does; modules in layer order."""
    after = {m.name: m for m in report.modules}
    modules = []
    for name, m in sorted(adapters.modules.items(), key=lambda item: layer_order(item[0])):
        modules.append({
            "name": name,
            "shape": [m.out_features, m.in_features],
            "scale": m.scale,
            "rank_before": m.rank,
            "rank_after": after[name].rank_after,
            "params_before": m.num_params(),
            "bytes_before": m.num_bytes(),
            "bytes_after": after[name].bytes_after,
            "bits": dict(m.bits),
        })
    return {
        "method": adapters.method.value,
        "task": adapters.task.value,
        "task_from": adapters.task_and_source[1],
        "num_labels": adapters.num_labels,
        "base_model_hint": adapters.base_model_hint,
        "hyperparameters": adapters.hyperparameters,
        "sources": [s.__dict__ for s in adapters.sources],
        "extra_tensors": {k: list(t.shape) for k, t in adapters.extra_tensors.items()},
        "notes": list(adapters.notes),
        "modules": modules,
        "totals": {
            "modules_before": len(adapters.modules),
            "modules_after": len(adapters.modules) - len(report.dropped_modules),
            "rank_before": report.rank_before,
            "rank_after": report.rank_after,
            "params_before": adapters.num_params(),
            "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after,
            "extra_bytes": adapters.extra_bytes(),
            "exact": report.exact,
        },
    }
