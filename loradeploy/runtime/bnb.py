"""transformers + PEFT session (bitsandbytes artifacts) through the target's runner.

PEFT's ``set_adapter`` mutates the model, so calls are serialized by one lock; PyTorch's
intra-op threads still use every core within a call. bitsandbytes 0.50 repacks 4-bit weights
in place on CPU in their first forward pass, and a PEFT ``load_adapter`` after that leaves the
model computing something else (measured: base logits off by 0.2, the new adapter's by 0.8);
so an adapter loaded after the session has served rebuilds the model from the artifact with
every held adapter attached (seconds), then swaps it in. Switching and unloading stay cheap.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

from ..errors import BaseModelError
from .session import HfTokenizer, Session, refuse


class BnbSession(HfTokenizer, Session):
    runtime = "bitsandbytes"

    def __init__(self, artifact: Path, manifest: dict, threads: int = 0, workers: int = 0):
        super().__init__(artifact, manifest)
        self._threads = threads
        self._engine = threading.Lock()
        self._serial = 0
        self._paths: dict[str, Path] = {}  # PEFT adapter name → folder, in load order
        self._zombie: str | None = None  # see _free
        self.runner = self._build()
        self._tokenizer = self.runner._tokenizer

    def _build(self):
        from ..ir import Task
        from ..targets.bnb import BnbRunner

        runner = BnbRunner(self.artifact, Task(self.task), [], self._threads)
        for handle, path in self._paths.items():
            self._attach(runner, handle, path)
        self._served = False
        return runner

    @staticmethod
    def _attach(runner, handle: str, path: Path) -> None:
        from peft import PeftModel

        if isinstance(runner.model, PeftModel):
            runner.model.load_adapter(str(path), adapter_name=handle)
        else:
            runner.model = PeftModel.from_pretrained(runner.model, str(path), adapter_name=handle)
        runner.model.eval()
        runner.adapters += (handle,)

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
                self._attach(self.runner, handle, Path(path))
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
