"""bitsandbytes plugin, runtime side: the one loader of bitsandbytes artifacts (transformers holding
the quantized base once, PEFT adapters beside it). The artifact's writer is
``loradeploy.plugins.bitsandbytes.exporter``.

PEFT's ``set_adapter`` mutates the model, so calls are serialized by one lock; PyTorch's
intra-op threads still use every core within a call. bitsandbytes 0.50 repacks 4-bit weights
in place on CPU in their first forward pass, and a PEFT ``load_adapter`` after that leaves the
model computing something else (measured: base logits off by 0.2, the new adapter's by 0.8);
so an adapter loaded after the session has served rebuilds the model from the artifact with
every held adapter attached (seconds), then swaps it in. Switching and unloading stay cheap.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from ...errors import BaseModelError
from ...kinds import Task
from . import SPEC
from ...runtime.session import HfTokenizer, Session, refuse



class _Model:
    """transformers (+ PEFT) holding the quantized base once; adapters switched per call."""

    def __init__(self, artifact: Path, task: str, threads: int = 0):
        import torch
        import transformers

        from ...base import auto_class
        from ...ir import Task

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self.task = Task(task)
        self.model = auto_class(self.task).from_pretrained(str(artifact)).eval()
        self.adapters: tuple[str, ...] = ()

    def attach(self, handle: str, path: Path) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=handle)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=handle)
        self.model.eval()
        self.adapters += (handle,)

    def forward(self, adapter: str | None, **inputs):
        import torch

        if self.adapters and adapter is not None:
            self.model.set_adapter(adapter)
        ctx = self.model.disable_adapter() if self.adapters and adapter is None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return self.model(**inputs)

    def run(self, input_ids, attention_mask, adapter=None) -> np.ndarray:
        import torch

        from ...ir import Task

        ids, mask = torch.from_numpy(np.asarray(input_ids)), torch.from_numpy(np.asarray(attention_mask))
        out = self.forward(adapter, input_ids=ids, attention_mask=mask)
        if self.task is Task.SEQUENCE_CLASSIFICATION:
            return out.logits.float().numpy()
        if self.task is Task.CAUSAL_LM:
            return out.logits[:, -1].float().numpy()
        m = mask.unsqueeze(-1).float()
        return ((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().numpy()


class BnbSession(HfTokenizer, Session):
    runtime = SPEC.name

    def __init__(self, artifact: Path, manifest, threads: int = 0, workers: int = 0):
        super().__init__(artifact, manifest)
        self._threads = threads
        self._engine = threading.Lock()
        self._serial = 0
        self._paths: dict[str, Path] = {}  # PEFT adapter name → folder, in load order
        self._zombie: str | None = None  # see _free
        self.runner = self._build()

    def _build(self) -> _Model:
        runner = _Model(self.artifact, self.task, self._threads)
        for handle, path in self._paths.items():
            runner.attach(handle, path)
        self._served = False
        return runner

    def _check_tensors(self, path):
        from safetensors import safe_open

        weights = path / "adapter_model.safetensors"
        if not (path / "adapter_config.json").is_file() or not weights.is_file():
            raise BaseModelError(f"{path}: not a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
        model = self.runner.model
        modules = dict((model.get_base_model() if hasattr(model, "get_base_model") else model).named_modules())
        problems = []
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        for key, shape in sorted(shapes.items()):
            for role in (".lora_A.weight", ".lora_B.weight"):
                if not key.endswith(role):
                    continue
                name = key.removeprefix("base_model.model.").removesuffix(role)
                m = modules.get(name)
                if m is None or not hasattr(m, "in_features"):
                    problems.append(f"{name} is not a linear layer of the base")
                elif (role == ".lora_A.weight" and shape[1] != m.in_features) or (
                        role == ".lora_B.weight" and shape[0] != m.out_features):
                    problems.append(f"{key} is {list(shape)}, the base layer is {m.out_features}×{m.in_features}")
        refuse(path, "base model", problems)

    def _load(self, name, path):
        with self._engine:
            self._serial += 1
            handle = f"{name.replace('.', '_')}_{self._serial}"  # unique: a name may be reused before its
            # unloaded namesake is freed; no dots (torch module names)
            if self._zombie:
                self._paths.pop(self._zombie)
            self._paths[handle] = Path(path)
            if self._served:  # see the module doc
                self.runner = self._build()
            else:
                self.runner.attach(handle, Path(path))
                if self._zombie:
                    self._delete(self._zombie)
            self._zombie = None
        return handle

    def _free(self, rec):
        with self._engine:
            if len(self.runner.adapters) > 1:
                self._paths.pop(rec.handle)
                self._delete(rec.handle)
            else:  # PEFT cannot run with no adapter (and unload() keeps the head of the
                self._zombie = rec.handle  # active one): kept, unreachable, until the next load

    def _delete(self, handle: str) -> None:
        self.runner.adapters = tuple(a for a in self.runner.adapters if a != handle)
        with warnings.catch_warnings():  # "… was active which is now deleted": handled below
            warnings.simplefilter("ignore", UserWarning)
            self.runner.model.delete_adapter(handle)
        self.runner.model.set_adapter(self.runner.adapters[0])  # PEFT may keep the deleted one active

    def _run(self, inputs, rec):
        with self._engine:
            self._served = True
            return self.runner.run(inputs["input_ids"], inputs["attention_mask"], rec.handle if rec else None)

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        import torch

        rec = None
        if adapter is not None:
            with self._lock:
                rec = self._adapters.get(adapter)
            if rec is None:
                raise BaseModelError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
        with self._engine:
            self._served = True
            out = self.runner.forward(rec.handle if rec else None, input_ids=torch.tensor([tokens]))
        return out.logits[0].float().numpy()

    @staticmethod
    def reference_unit(threads: int = 0):
        """A fixed fp32 MLP block (384 → 1536 → 384 on 128 positions, seeded weights) in PyTorch,
        the runtime bitsandbytes computes in, at the session's thread count."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        x, w1, w2 = (torch.randn(shape, generator=g) * 0.05 for shape in ((128, 384), (384, 1536), (1536, 384)))

        def unit() -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                torch.relu(x @ w1) @ w2
            return (time.perf_counter() - t0) * 1e3
        return unit
