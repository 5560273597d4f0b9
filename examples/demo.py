"""`make demo`: inspect and exactly prune the three shipped example adapters (SoRA, IncreLoRA,
Bayesian-LoRA, all trained on all-MiniLM-L6-v2) and print one table.

Each pruned adapter is written as a PEFT LoRA folder under out/demo/<method>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loradeploy.cli import _quiet_third_party_logs
from loradeploy.errors import LoradeployError
from loradeploy.pipeline import prune_adapter
from loradeploy.render import console, print_summary_table

HERE = Path(__file__).resolve().parent
ADAPTERS = {"sora": HERE / "adapters" / "sora", "increlora": HERE / "adapters" / "increlora",
            "blora": HERE / "adapters" / "blora"}
OUT = HERE.parent / "out" / "demo"


def main() -> int:
    _quiet_third_party_logs()
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
    console.print(f"pruned PEFT adapters written under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
