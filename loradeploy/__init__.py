"""loradeploy: ship trained rank-adaptive LoRA adapters (SoRA, IncreLoRA, B-LoRA) to edge runtimes.

The public API is what ``__all__`` names here, plus the modules listed in :data:`PUBLIC_MODULES`
(docs/python-api.md says what each holds). Names are imported on first use, so
``import loradeploy`` stays cheap (the command line's parsing does not load torch). Anything
else — a module not listed, a name with a leading underscore — may change without notice.
"""

from __future__ import annotations

import importlib
import os as _os

__version__ = "0.1.0"

# PyTorch's OpenMP threads (libgomp) spin at each barrier before they sleep. On a machine whose
# cores other processes use too, a spinning thread holds the core the thread it waits for needs:
# the fp32 reference of a MiniLM export (500 texts, 2 threads, load average ~10) took 27-40 s
# and 11-13 CPU s, passive 8-9 s and 3 CPU s (issue 34). libgomp reads this when it loads, so it
# is set before anything here imports torch; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: public name → the module that defines it. A verb whose module has its own name (``export``,
#: ``prune``, ``check`` …) is imported from that module (``from loradeploy.export import export``):
#: the package attribute ``loradeploy.export`` is the module, and binding a function to the same
#: name would be undone by the first ``import loradeploy.export``.
_PUBLIC = {
    "read_adapter": "loradeploy.adapters",
    "inspect_adapter": "loradeploy.pipeline",
    "prune_adapter": "loradeploy.pipeline",
    "open_artifact": "loradeploy.runtime",
    "ABRouter": "loradeploy.runtime.router",
    "LoradeployError": "loradeploy.errors",
    "quiet_third_party_logs": "loradeploy.logs",
}
#: names whose attribute in their module is spelled differently
_ATTRIBUTE = {"open_artifact": "open"}

#: modules users may import from (their names without a leading underscore)
PUBLIC_MODULES = (
    "loradeploy.adapters",        # read_adapter
    "loradeploy.adapters.peft",   # write(adapters, folder): a PEFT LoRA folder
    "loradeploy.prune",           # prune(adapters) → (AdapterSet, PruneReport)
    "loradeploy.job",             # AdapterSpec, AdapterInputs: the adapters of an export
    "loradeploy.export",          # ExportConfig, export
    "loradeploy.quantize",        # PlanConfig, QuantizeConfig, quantize
    "loradeploy.validate",        # ValidateConfig, revalidate
    "loradeploy.verify",          # verify
    "loradeploy.check",           # CheckConfig, check
    "loradeploy.fleet.run",       # FleetConfig, run_fleet
    "loradeploy.runtime",         # open(artifact) → Session: run, load_adapter, unload_adapter
    "loradeploy.runtime.router",  # ABRouter
    "loradeploy.render",          # the command line's tables, for scripts that print like it
    "loradeploy.errors",
    "loradeploy.logs",
)

__all__ = ["__version__", "PUBLIC_MODULES", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'loradeploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ATTRIBUTE.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

