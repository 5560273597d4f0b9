"""onnx-web target: the swappable encoder as a static web bundle (see the package doc).

``model.onnx`` takes every LoRA slot ``P.lora_A [in, r]`` / ``P.lora_B [r, out]`` (rank a dynamic
axis per module; "no adapter" is an empty ``[in, 0]`` / ``[0, out]`` tensor) and every travelling
tensor (LayerNorm weights and biases with the default slots, the head) as a plain graph input
with no initializer behind it. ``base.safetensors`` holds the values those travelling inputs take
when an adapter does not carry them (the base's; the head: the first adapter's, as the ONNX
Runtime target's default). ``adapters/<name>.safetensors``: the adapter's tensors keyed by graph
input, scale and rank gates folded into B, the metadata naming the format and the base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import LoradeployError
from ...manifest import ADAPTER_DIR
from ...targets.common import Target
from . import BASE_TENSORS, FORMAT, FORMAT_VERSION, MODEL_FILE
from .bundle import web_config, write_config, write_web_files

if TYPE_CHECKING:
    from ...job import ExportJob

#: the eval texts the demo page offers and the browser check runs (the shipped set's first ones)
EXAMPLES = 4


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over the base's weight files' sha256 (what an adapter file names as its base)."""
    from ...fsutil import file_sha256

    weights = [base_dir] if base_dir.is_file() else \
        sorted(base_dir.glob("*.safetensors")) or sorted(base_dir.glob("*.bin"))
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in weights).encode()).hexdigest()


def _plain_inputs(path: Path, names: set[str]) -> None:
    """Every slot and travelling tensor is a graph input with no initializer of the same name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    shadowed = sorted(names & {i.name for i in model.graph.initializer})
    missing = sorted(names - inputs)
    if shadowed or missing:
        raise LoradeployError(f"{path}: inputs {', '.join((shadowed or missing)[:3])} are not plain graph inputs")


class WebTarget(Target):
    """Writes the web bundle (loaded by :mod:`loradeploy.plugins.onnx_web.session`)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        import copy

        from safetensors.numpy import save_file

        from ...base import load_tokenizer
        from ...base_slots import choose as choose_slots
        from ...evaldata import MAX_LENGTH, load_eval
        from ...ir import Task
        from ...merge import find_module
        from ...traced_graph import (OUTPUT, GraphModule, eager_attention, export_graph, extra_inputs, lora_factors,
                                     travelling_tensors)
        from .node import require_packages

        require_packages()
        if job.task not in OUTPUT:
            raise LoradeployError(f"target {job.profile.name} exports encoders (classifiers, embeddings), "
                                  f"not a {job.task.value} model")
        if job.mode != "swappable":
            raise LoradeployError(f"target {job.profile.name} writes swappable bundles: export with --mode swappable")
        if any(e.quantized is not None for e in job.adapters):
            raise LoradeployError(f"target {job.profile.name} keeps adapters in fp32: drop --plan")
        qualified = {name: find_module(job.base_model, name)[0] for e in job.adapters for name in e.pruned.modules}
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        extras = travelling_tensors(job.base_model, [e.pruned for e in job.adapters], job.slots)
        module = GraphModule(eager_attention(copy.deepcopy(job.base_model)), job.task, list(slot_shapes), list(extras))
        precision = job.profile.precision
        traced = out / (MODEL_FILE if precision == "fp32" else "model.fp32.onnx")
        export_graph(module, slot_shapes, extras, traced, job.profile.options["opset"])
        slot_names = {f"{m}.{role}" for m in slot_shapes for role in ("lora_A", "lora_B")}
        base_decisions = {}
        if precision == "int8-dynamic":
            from .quantized_base import quantize_int8

            base_decisions = quantize_int8(traced, out / MODEL_FILE, slot_names | set(extras))
            traced.unlink()
        _plain_inputs(out / MODEL_FILE, slot_names | set(extras))
        fingerprint = base_fingerprint(job.base_dir)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "base_fingerprint": fingerprint}
        save_file(extras, str(out / BASE_TENSORS), metadata=meta)
        (out / ADAPTER_DIR).mkdir()
        files = {}
        for entry in job.adapters:
            tensors = lora_factors(entry.pruned, qualified)
            tensors.update(extra_inputs(entry.pruned, job.base_model))
            unknown = sorted(set(tensors) - slot_names - set(extras))
            if unknown:
                raise LoradeployError(f"{entry.source}: tensor {unknown[0]} has no input in the bundle's graph")
            files[entry.name] = f"{ADAPTER_DIR}/{entry.name}.safetensors"
            save_file(tensors, str(out / files[entry.name]), metadata={**meta, "adapter": entry.name})
        tokenizer = load_tokenizer(job.base_dir)
        labels = next((list(e.original.label_names) for e in job.adapters if e.original.label_names), None)
        config = web_config(task=job.task.value, output=OUTPUT[job.task], base_fingerprint=fingerprint,
                            slots=slot_shapes, travelling={n: list(a.shape) for n, a in extras.items()},
                            adapters=files, max_length=MAX_LENGTH, pad_token_id=int(tokenizer.pad_token_id or 0),
                            labels=labels, examples=load_eval(None).texts[:EXAMPLES])
        versions = write_web_files(out)
        write_config(out, config)
        return {"lora_slots_spec": job.slots, "lora_slots": len(slot_shapes),
                "lora_slot_modules": {m: list(s) for m, s in slot_shapes.items()},
                "travelling_inputs": len(extras), "graph_inputs_plain": True, "base_precision": precision,
                **base_decisions,
                "lora_precision": "float32", "rank_dimension": "dynamic per module", "web_packages": versions,
                "base_fingerprint": fingerprint}
