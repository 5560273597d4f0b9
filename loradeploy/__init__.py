"""loradeploy: ship trained rank-adaptive LoRA adapters (SoRA, IncreLoRA, B-LoRA) to edge runtimes."""

import os as _os

__version__ = "0.1.0"

# PyTorch's OpenMP threads (libgomp) spin at each barrier before they sleep. On a machine whose
# cores other processes use too, a spinning thread holds the core the thread it waits for needs:
# the fp32 reference of a MiniLM export (500 texts, 2 threads, load average ~10) took 27-40 s
# and 11-13 CPU s, passive 8-9 s and 3 CPU s (issue 34). libgomp reads this when it loads, so it
# is set before anything here imports torch; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
