"""onnxruntime session: one ``InferenceSession`` (``run`` is thread-safe); each call builds its
own ``RunOptions`` with its adapter (a ``LoraAdapter``) active, so calls share no adapter state."""

from __future__ import annotations

import numpy as np

from ..errors import BaseModelError
from .session import HfTokenizer, Session, refuse

class OrtSession(HfTokenizer, Session):
    runtime = "onnxruntime"

    def __init__(self, artifact: Path, manifest: dict, threads: int = 0, workers: int = 0):
        import onnxruntime as ort

        from ..targets.onnx import OnnxRunner

        super().__init__(artifact, manifest)
        self._ort = ort
        provider = manifest["target"].get("profile", {}).get("execution_provider", "CPUExecutionProvider")
        self.session = OnnxRunner(self.artifact, [], threads, provider).session
        self._slots = {i.name: i for i in self.session.get_overridable_initializers()}

    def _check_tensors(self, path):
        try:
            params = self._ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as e:  # onnxruntime raises its own RuntimeError types
            raise BaseModelError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0]})") from e
        problems = []
        for name, value in sorted(params.items()):
            slot = self._slots.get(name)
            if slot is None:
                problems.append(f"{name} is not an input of this graph")
            elif value.data_type() != slot.type or len(value.shape()) != len(slot.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(slot.shape, value.shape())):
                problems.append(f"{name} is {value.data_type()} {value.shape()}, the graph takes {slot.type} {slot.shape}")
        refuse(path, "graph inputs", problems)

    def _load(self, name, path):
        lora = self._ort.LoraAdapter()
        lora.Load(str(path))
        return lora

    def _free(self, rec):
        rec.handle = None  # calls hold their own RunOptions referencing it

    def _run(self, inputs, rec):
        options = self._ort.RunOptions()
        if rec is not None:
            options.add_active_adapter(rec.handle)
        feeds = {k: np.asarray(inputs[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        return self.session.run(None, feeds, options)[0]

    def close(self):
        super().close()
        self.session = None


