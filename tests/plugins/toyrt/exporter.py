"""The toy runtime's exporter: the adapter merged into a copy of the base, saved as safetensors."""

from __future__ import annotations

import copy
from pathlib import Path

from loradeploy.errors import LoradeployError
from loradeploy.merge import merge_into
from loradeploy.targets.common import Target, copy_tokenizer


class TorchTarget(Target):
    def export(self, job, out: Path, progress=None) -> dict:
        if job.mode != "merged":
            raise LoradeployError("torch-eager exports merged artifacts only")
        (entry,) = job.adapters
        model = copy.deepcopy(job.base_model)
        merge_into(model, entry.pruned)
        model.save_pretrained(out, safe_serialization=True)
        return {"files": sorted(p.name for p in out.iterdir()) + copy_tokenizer(job.base_dir, out)}
