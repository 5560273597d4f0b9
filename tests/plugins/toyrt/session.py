"""The toy runtime's session: the merged folder in transformers, run in PyTorch eager mode."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from loradeploy.errors import LoradeployError
from loradeploy.runtime.session import HfTokenizer, Session


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        return f"not a safetensors file ({e})"
    return None


class TorchSession(HfTokenizer, Session):
    runtime = "torch-eager"
    FILE_CHECKS = {".safetensors": _safetensors_problem}

    def __init__(self, artifact: Path, manifest, threads: int = 0, workers: int = 0):
        import transformers

        super().__init__(artifact, manifest)
        auto = (transformers.AutoModelForSequenceClassification if self.task == "sequence-classification"
                else transformers.AutoModel)
        self.model = auto.from_pretrained(str(artifact)).eval()

    def _check_tensors(self, path):
        raise LoradeployError(f"{path}: torch-eager artifacts are merged; they take no adapters")

    def _load(self, name, path):
        raise LoradeployError("torch-eager artifacts take no adapters")

    def _free(self, rec):
        pass

    def _run(self, inputs, rec):
        import torch

        ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
        mask = torch.from_numpy(np.asarray(inputs["attention_mask"], np.int64))
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask)
        if self.task == "sequence-classification":
            return out.logits.float().numpy()
        m = mask.unsqueeze(-1).float()
        return ((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().numpy()

    @staticmethod
    def reference_unit(threads: int = 0):
        import torch

        g = torch.Generator().manual_seed(0)
        w1, w2 = torch.randn(384, 1536, generator=g) * 0.05, torch.randn(1536, 384, generator=g) * 0.05
        x = torch.randn(1, 128, 384, generator=g)

        def unit() -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                torch.relu(x @ w1) @ w2
            return (time.perf_counter() - t0) * 1e3
        return unit
