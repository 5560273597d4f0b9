"""`make demo`: inspect and exactly prune the three shipped example adapters (SoRA, IncreLoRA,
Bayesian-LoRA, all trained on all-MiniLM-L6-v2) and print one table; then export the SoRA
adapter to ONNX Runtime (`loradeploy export --target onnx-cpu`) and print its validation table.

Pruned adapters are written as PEFT LoRA folders under out/demo/<method>/, the ONNX artifact
to out/demo/onnx-cpu/ (manifest.json, report.html).
"""

from __future__ import annotations

import sys
from pathlib import Path

from loradeploy import LoradeployError, prune_adapter, quiet_third_party_logs
from loradeploy.export import ExportConfig, export
from loradeploy.job import AdapterInputs
from loradeploy.render import console, print_export, print_summary_table, progress_steps

HERE = Path(__file__).resolve().parent
ADAPTERS = {"sora": HERE / "adapters" / "sora", "increlora": HERE / "adapters" / "increlora",
            "blora": HERE / "adapters" / "blora"}
OUT = HERE.parent / "out" / "demo"


def main() -> int:
    quiet_third_party_logs()
    rows = []
    for name, path in ADAPTERS.items():
        try:
            record = prune_adapter(path, OUT / name, overwrite=True)
        except LoradeployError as e:
            console.print(f"error: {e}")
            return 2
        rows.append({"name": name, **record})
    print_summary_table(rows)
    for r in rows:
        for note in r["notes"]:
            console.print(f"{r['name']}: {note}")
    console.print(f"pruned PEFT adapters written under {OUT}\n")
    console.print("[bold]loradeploy export --base minilm --adapter examples/adapters/sora --target onnx-cpu[/]")
    try:
        with progress_steps() as step:
            config = ExportConfig("minilm", AdapterInputs.of({"sora": ADAPTERS["sora"]}), "onnx-cpu",
                                  OUT / "onnx-cpu", overwrite=True)
            record = export(config, step)
    except LoradeployError as e:
        console.print(f"error: {e}")
        return 2
    print_export(record)
    return 0 if record["validation"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
