"""An adapter in a swappable ONNX graph: which form each LoRA slot is stored in (the plan's
format, the highest any adapter of the artifact needs), the adapter's tensors in those forms, and
the ``.onnx_adapter`` file (onnxruntime ``AdapterFormat``) that carries them. Shared by the
encoder and the decoder exporters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import SPEC

if TYPE_CHECKING:
    from ...job import ExportJob


def write_adapter_file(tensors: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    # OrtValue.ortvalue_from_numpy does not copy: `tensors` must stay alive until exported
    values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in tensors.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def lora_slot_decisions(spec: str, slot_shapes: dict[str, tuple[int, int]]) -> dict:
    """What the manifest records about a swappable graph's LoRA slots."""
    return {"lora_slots_spec": spec, "lora_slots": len(slot_shapes),
            "lora_slot_modules": {m: list(shape) for m, shape in slot_shapes.items()}}


def slot_formats(job: ExportJob, qualified: dict[str, str],
                 slot_shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[str, str, int]]:
    """Graph input → (format, role, row length): the plan's format for that tensor, the
    highest precision any adapter of the artifact needs (they share one graph)."""
    ladder = SPEC.storage.ladder
    out = {}
    for q, (in_f, out_f) in slot_shapes.items():
        for role, n in (("lora_A", in_f), ("lora_B", out_f)):
            wanted = [e.quantized.formats[f"{name}.{role}"] for e in job.adapters if e.quantized is not None
                      for name, qn in qualified.items() if qn == q and name in e.pruned.modules]
            if any(e.quantized is None for e in job.adapters):
                wanted.append("fp32")
            out[f"{q}.{role}"] = (min(wanted, key=ladder.index) if wanted else "fp32", role, n)
    return out


def lora_inputs(entry, qualified: dict[str, str], formats: dict[str, tuple[str, str, int]]) -> dict[str, np.ndarray]:
    """An adapter's LoRA tensors in the graph's stored forms; a tensor whose planned format is
    lower than the graph's (another adapter needs more) is stored in the graph's format."""
    from ...quant.formats import quantize
    from ...quant.plan import stored_matrix
    from .lora_inputs import input_arrays

    tensors = {}
    for name, m in entry.pruned.modules.items():
        for role in ("lora_A", "lora_B"):
            graph_name = f"{qualified[name]}.{role}"
            fmt = formats[graph_name][0]
            stored = entry.quantized.stored[f"{name}.{role}"]
            if stored.format != fmt:
                stored = quantize(stored_matrix(m, role, SPEC.storage), fmt)
            tensors.update(input_arrays(graph_name, role, fmt, stored))
    return tensors
