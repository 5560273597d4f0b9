"""ExecuTorch target: encoders lowered to XNNPACK, one ``model.pte``. Attention is traced as explicit
matmuls and softmax (``eager_attention``): XNNPACK takes them, where the SDPA form leaves its mask
handling to portable kernels between delegate segments (MiniLM b1 s128, 1 thread: 33 vs 48 ms).

* merged: the adapter's ΔW folded into the base, the program takes ``input_ids``/``attention_mask``.
* swappable: one base program whose every LoRA slot ``P.lora_A [in, r]`` / ``P.lora_B [r, out]``
  (scale and rank gates folded into B) and every travelling tensor (LayerNorm weights and biases
  with the default slots, the head) is a method input. ExecuTorch plans memory for bounded
  shapes: each slot's rank axis r is dynamic, 1 to the module's bound R (by default the largest
  rank the exported adapters have at that module, at most the profile's ``rank_bound``; with
  ``fixed_rank_bound`` the profile's ``rank_bound`` everywhere). The session feeds each adapter's
  factors at their own rank, and a rank-1 zero pair where it has no module. ``base.ptd`` holds the
  travelling inputs' defaults (the base's; the head: the first adapter's); ``adapters/<name>.ptd``
  one adapter's tensors at their own rank, keyed by method input (module name + role), in
  ExecuTorch's tensor-data format.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import LoradeployError
from ...manifest import ADAPTER_DIR
from ...targets.common import Target
from . import BASE_TENSORS, FORMAT, FORMAT_VERSION, PROGRAM_CONFIG, PROGRAM_FILE

if TYPE_CHECKING:
    from ...job import ExportJob


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over ``name:sha256`` of the base's weight files (what an adapter file names as its base)."""
    from ...fsutil import file_sha256

    weights = [base_dir] if base_dir.is_file() else \
        sorted(base_dir.glob("*.safetensors")) or sorted(base_dir.glob("*.bin"))
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in weights).encode()).hexdigest()


def rank_problems(job: ExportJob, bound: int) -> list[str]:
    """Every adapter module whose rank is above ``bound``, one line each."""
    return [f"{entry.source}: module {name} has rank {int(m.lora_A.shape[0])}, above the rank bound {bound} of "
            f"profile {job.profile.name} (rank_bound)"
            for entry in job.adapters for name, m in sorted(entry.pruned.modules.items())
            if int(m.lora_A.shape[0]) > bound]


def rank_bounds(job: ExportJob, slot_shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each slot's rank bound: the profile's ``rank_bound`` with ``fixed_rank_bound``, else the
    largest rank the exported adapters have at that module (1 where none adapts it)."""
    from ...merge import find_module

    cap = job.profile.options["rank_bound"]
    if job.profile.options["fixed_rank_bound"]:
        return dict.fromkeys(slot_shapes, cap)
    bounds = dict.fromkeys(slot_shapes, 1)
    for entry in job.adapters:
        for name, m in entry.pruned.modules.items():
            module = find_module(job.base_model, name)[0]
            bounds[module] = min(cap, max(bounds[module], int(m.lora_A.shape[0])))
    return bounds


def method_inputs(slot_shapes: dict[str, tuple[int, int]], bounds: dict[str, int],
                  extras: dict[str, np.ndarray]) -> list[dict]:
    """The program's tensor inputs after ``input_ids``/``attention_mask``, in order; a factor's
    shape is at its slot's rank bound, its rank axis dynamic (1 to the bound)."""
    inputs = []
    for module, (n_in, n_out) in slot_shapes.items():
        rank = {"rank_axis": "dynamic"} if bounds[module] > 1 else {}
        inputs.append({"name": f"{module}.lora_A", "role": "lora_A", "shape": [n_in, bounds[module]], **rank})
        inputs.append({"name": f"{module}.lora_B", "role": "lora_B", "shape": [bounds[module], n_out], **rank})
    inputs += [{"name": name, "role": "travelling", "shape": list(arr.shape)} for name, arr in extras.items()]
    return inputs


def quantize_base(job: ExportJob, module) -> dict:
    """For a quantized profile, the base's linear layers in ``module`` (a GraphModule) quantized
    by torchao (:func:`.program.quantize_linears`); the task head stays fp32. What was decided."""
    from ...merge import is_head_tensor
    from .program import QUANTIZED, quantize_linears

    if job.profile.precision == "fp32":
        return {}
    bits, group = QUANTIZED[job.profile.precision]
    chosen = quantize_linears(module, job.profile.precision,
                              lambda name: is_head_tensor(job.base_model, f"{name.removeprefix('model.')}.weight"))
    return {"quantized_linears": len(chosen), "weight_bits": bits,
            "weight_granularity": "per output channel" if group == 0 else f"groups of {group}",
            "activations": "int8, dynamic per token", "quantizer": "torchao Int8DynamicActivationIntxWeightConfig"}


class ExecuTorchTarget(Target):
    """Writes merged or swappable ExecuTorch programs (loaded by :mod:`.session`)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        import json

        from ...evaldata import MAX_LENGTH
        from ...traced_graph import OUTPUT

        if job.task not in OUTPUT:
            raise LoradeployError(f"target {job.profile.name} exports encoders (classifiers, embeddings), "
                                  f"not a {job.task.value} model")
        if any(e.quantized is not None for e in job.adapters):
            raise LoradeployError(f"target {job.profile.name} keeps adapters in fp32: drop --plan")
        max_batch = job.profile.options["max_batch"]
        fingerprint = base_fingerprint(job.base_dir)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": job.task.value,
                  "output": OUTPUT[job.task], "program": PROGRAM_FILE, "max_batch": max_batch,
                  "max_seq": MAX_LENGTH, "base_fingerprint": fingerprint, "mode": job.mode}
        if job.mode == "merged":
            decisions = self._merged(job, out, max_batch, MAX_LENGTH)
            config.update(rank_bound=None, inputs=[], base_tensors=None)
        else:
            decisions, inputs = self._swappable(job, out, max_batch, MAX_LENGTH, fingerprint)
            config.update(rank_bound=decisions["rank_bound"], inputs=inputs, base_tensors=BASE_TENSORS)
        (out / PROGRAM_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        return {**decisions, "base_precision": job.profile.precision, "lora_precision": "float32", "backend": "xnnpack",
                "dynamic_axes": {"batch": [1, max_batch], "seq": [2, MAX_LENGTH]}, "base_fingerprint": fingerprint}

    @staticmethod
    def _merged(job: ExportJob, out: Path, max_batch: int, max_seq: int) -> dict:
        from ...merge import merge_into
        from ...traced_graph import GraphModule, eager_attention
        from .program import lower_to_pte

        (entry,) = job.adapters
        model = merge_into(eager_attention(copy.deepcopy(job.base_model)), entry.pruned)
        module = GraphModule(model, job.task, [], [])
        decisions = quantize_base(job, module)
        summary = lower_to_pte(module, [], max_batch, max_seq, out / PROGRAM_FILE)
        return {"partition": summary, **decisions}

    @staticmethod
    def _swappable(job: ExportJob, out: Path, max_batch: int, max_seq: int, fingerprint: str) -> tuple[dict, list[dict]]:
        from ...base_slots import choose as choose_slots
        from ...merge import find_module
        from ...traced_graph import GraphModule, adapter_inputs, eager_attention, travelling_tensors
        from .program import linear_slots, lower_to_pte
        from .tensor_data import write_tensor_data

        bound = job.profile.options["rank_bound"]
        problems = rank_problems(job, bound)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LoradeployError(problems[0] + more)
        qualified = {name: find_module(job.base_model, name)[0] for e in job.adapters for name in e.pruned.modules}
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        bounds = rank_bounds(job, slot_shapes)
        extras = travelling_tensors(job.base_model, [e.pruned for e in job.adapters], job.slots)
        inputs = method_inputs(slot_shapes, bounds, extras)
        examples = [np.zeros(i["shape"], np.float32) for i in inputs if i["role"] != "travelling"] + list(extras.values())
        module = GraphModule(eager_attention(copy.deepcopy(job.base_model)), job.task, list(slot_shapes), list(extras))
        linear_slots(module)
        quantized = quantize_base(job, module)
        summary = lower_to_pte(module, examples, max_batch, max_seq, out / PROGRAM_FILE, list(bounds.values()))
        meta = {"base_fingerprint": fingerprint, "rank_bound": bound}
        write_tensor_data(extras, out / BASE_TENSORS, {**meta, "adapter": ""})
        names = {i["name"] for i in inputs}
        (out / ADAPTER_DIR).mkdir()
        sizes = {}
        for entry in job.adapters:
            tensors = adapter_inputs(entry.pruned, qualified, job.base_model, names, entry.source, "program")
            sizes[entry.name] = write_tensor_data(tensors, out / ADAPTER_DIR / f"{entry.name}.ptd",
                                                  {**meta, "adapter": entry.name})
        return {"partition": summary, **quantized, "lora_slots_spec": job.slots, "lora_slots": len(slot_shapes),
                "lora_slot_modules": {m: list(s) for m, s in slot_shapes.items()}, "rank_bound": bound,
                "rank_bounds": bounds, "fixed_rank_bound": job.profile.options["fixed_rank_bound"],
                "rank_dimension": "dynamic per module, 1 to its rank bound", "travelling_inputs": len(extras),
                "adapter_file_bytes": sizes}, inputs
