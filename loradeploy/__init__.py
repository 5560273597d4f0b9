"""loradeploy: ship trained rank-adaptive LoRA adapters (SoRA, IncreLoRA, B-LoRA) to edge runtimes."""

__version__ = "0.1.0"
