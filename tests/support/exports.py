"""Exports for tests: one ExportConfig per call, from the few arguments tests vary."""

from __future__ import annotations

from pathlib import Path

from loradeploy.export import ExportConfig, export
from loradeploy.job import AdapterInputs, AdapterSpec
from loradeploy.quantize import PlanConfig


def export_adapters(base: str, specs: list[AdapterSpec], target: str, out: Path, *, mode: str | None = None,
                    eval_path: Path | None = None, plan: str | None = None, overwrite: bool = False,
                    progress=None, slots: str | None = None, calibration: Path | None = None) -> dict:
    """``loradeploy export`` on ``specs`` (the manifest as JSON data)."""
    plan_config = PlanConfig.parse(plan, calibration=Path(calibration) if calibration else None)
    config = ExportConfig(str(base), AdapterInputs.of(list(specs)), str(target), Path(out), mode,
                          Path(eval_path) if eval_path else None, plan_config, overwrite, slots)
    return export(config, progress)
