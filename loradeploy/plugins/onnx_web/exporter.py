"""onnx-web target: the swappable encoder as a static web bundle (see the package doc).

``model.onnx`` takes every LoRA slot ``P.lora_A [in, r]`` / ``P.lora_B [r, out]`` (rank a dynamic
axis per module; "no adapter" is an empty ``[in, 0]`` / ``[0, out]`` tensor) and every travelling
tensor (LayerNorm weights and biases with the default slots, the head) as a plain graph input
with no initializer behind it. ``base.safetensors`` holds the values those travelling inputs take
when an adapter does not carry them (the base's; the head: the first adapter's, as the ONNX
Runtime target's default). ``adapters/<name>.safetensors``: the adapter's tensors keyed by graph
input, scale and rank gates folded into B, the metadata naming the format and the base. In a
fleet, the graph, ``base.safetensors`` (the head then zeros) and the web files are built once and
hard-linked into every bundle of the same base and slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import LoradeployError
from ...fsutil import link_or_copy
from ...manifest import ADAPTER_DIR
from ...targets.common import Target
from . import BASE_TENSORS, MODEL_FILE, file_metadata
from .bundle import base_fingerprint, web_config, web_files, write_config, write_web_files

if TYPE_CHECKING:
    from ...job import ExportJob

#: the eval texts the demo page offers and the browser check runs (the shipped set's first ones)
EXAMPLES = 4


def _plain_inputs(path: Path, names: set[str]) -> None:
    """Every slot and travelling tensor is a graph input with no initializer of the same name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    shadowed = sorted(names & {i.name for i in model.graph.initializer})
    missing = sorted(names - inputs)
    if shadowed or missing:
        raise LoradeployError(f"{path}: inputs {', '.join((shadowed or missing)[:3])} are not plain graph inputs")


def _check_job(job: ExportJob) -> None:
    from ...kinds import Task
    from ...traced_graph import OUTPUT
    from .node import require_packages

    require_packages()
    lm = job.task is Task.CAUSAL_LM
    if lm != (job.profile.precision == "int4"):
        raise LoradeployError(f"target {job.profile.name} exports causal LMs, not a {job.task.value} model" if not lm
                              else f"target {job.profile.name} exports encoders (classifiers, embeddings); a causal LM "
                              "goes to onnx-web-int4")
    if not lm and job.task not in OUTPUT:
        raise LoradeployError(f"target {job.profile.name} exports encoders (classifiers, embeddings), "
                              f"not a {job.task.value} model")
    if job.mode != "swappable":
        raise LoradeployError(f"target {job.profile.name} writes swappable bundles: export with --mode swappable")
    if any(e.quantized is not None for e in job.adapters):
        raise LoradeployError(f"target {job.profile.name} keeps adapters in fp32: drop --plan")


def _write_base(job: ExportJob, slot_shapes: dict[str, tuple[int, int]], extras: dict, out: Path) -> dict:
    """What every bundle of this base and these slots shares: ``model.onnx`` (at the profile's
    precision), ``base.safetensors`` (the travelling inputs' values) and the web files."""
    import copy

    from safetensors.numpy import save_file

    from ...traced_graph import INPUTS, GraphModule, eager_attention, export_graph

    module = GraphModule(eager_attention(copy.deepcopy(job.base_model)), job.task, list(slot_shapes), list(extras))
    precision = job.profile.precision
    traced = out / (MODEL_FILE if precision == "fp32" else "model.fp32.onnx")
    export_graph(module, slot_shapes, extras, traced, job.profile.options["opset"])
    inputs = {f"{m}.{role}" for m in slot_shapes for role in ("lora_A", "lora_B")} | set(extras)
    decisions = {}
    if precision == "int8-dynamic":
        from .quantized_base import quantize_int8

        decisions = quantize_int8(traced, out / MODEL_FILE, inputs, token_ids=INPUTS[0])
        traced.unlink()
    _plain_inputs(out / MODEL_FILE, inputs)
    fingerprint = base_fingerprint(job.base_dir)
    save_file(extras, str(out / BASE_TENSORS), metadata=file_metadata(base_fingerprint=fingerprint))
    return {"lora_slot_modules": {m: list(s) for m, s in slot_shapes.items()},
            "travelling_shapes": {n: list(a.shape) for n, a in extras.items()}, "travelling_inputs": len(extras),
            "graph_inputs_plain": True, "base_precision": precision, **decisions, "lora_precision": "float32",
            "rank_dimension": "dynamic per module", "web_packages": write_web_files(out),
            "base_fingerprint": fingerprint}


def _write_adapters(job: ExportJob, base: dict, out: Path) -> None:
    """One safetensors file per adapter (tensors keyed by graph input) and ``web.json``."""
    from safetensors.numpy import save_file

    from ...base import load_tokenizer
    from ...evaldata import MAX_LENGTH, load_eval
    from ...merge import find_module
    from ...traced_graph import OUTPUT, adapter_inputs

    slots = {m: tuple(s) for m, s in base["lora_slot_modules"].items()}
    inputs = {f"{m}.{role}" for m in slots for role in ("lora_A", "lora_B")} | set(base["travelling_shapes"])
    qualified = {name: find_module(job.base_model, name)[0] for e in job.adapters for name in e.pruned.modules}
    (out / ADAPTER_DIR).mkdir()
    files = {}
    for entry in job.adapters:
        tensors = adapter_inputs(entry.pruned, qualified, job.base_model, inputs, entry.source, "bundle's graph")
        files[entry.name] = f"{ADAPTER_DIR}/{entry.name}.safetensors"
        save_file(tensors, str(out / files[entry.name]),
                  metadata=file_metadata(base_fingerprint=base["base_fingerprint"], adapter=entry.name))
    labels = next((list(e.original.label_names) for e in job.adapters if e.original.label_names), None)
    write_config(out, web_config(
        task=job.task.value, output=OUTPUT[job.task], base_fingerprint=base["base_fingerprint"], slots=slots,
        travelling=base["travelling_shapes"], adapters=files, max_length=MAX_LENGTH,
        pad_token_id=int(load_tokenizer(job.base_dir).pad_token_id or 0), labels=labels,
        examples=load_eval(None).texts[:EXAMPLES]))


class WebTarget(Target):
    """Writes the web bundle (loaded by :mod:`loradeploy.plugins.onnx_web.session`)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        from ...base_slots import choose as choose_slots
        from ...traced_graph import travelling_tensors

        _check_job(job)
        if job.profile.precision == "int4":
            from .lm_bundle import export_lm_bundle

            return export_lm_bundle(job, out, progress)
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        extras = travelling_tensors(job.base_model, [e.pruned for e in job.adapters], job.slots)
        base = _write_base(job, slot_shapes, extras, out)
        _write_adapters(job, base, out)
        return {"lora_slots_spec": job.slots, "lora_slots": len(slot_shapes), **base}

    # --- one base graph and web files shared by a fleet's bundles (loradeploy.fleet) -----------

    def shared_base(self, job: ExportJob) -> dict | None:
        """The slots and travelling tensors the shared graph depends on (see onnx-cpu's)."""
        from ...base_slots import choose as choose_slots
        from ...traced_graph import travelling_tensors

        if job.mode != "swappable" or any(e.quantized is not None for e in job.adapters) or \
                job.profile.precision == "int4":  # LM bundles are not shared in a fleet (yet)
            return None
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        extras = travelling_tensors(job.base_model, [e.pruned for e in job.adapters], job.slots)
        return {"slots_spec": job.slots, "slots": {m: list(s) for m, s in slot_shapes.items()},
                "travelling": {n: list(a.shape) for n, a in extras.items()}}

    def export_shared(self, job: ExportJob, signature: dict, out: Path, progress=None) -> dict:
        """The shared files of ``signature``, holding no adapter: a travelling tensor's value is
        the base's, the task head's zeros (a shared graph must not depend on the first adapter)."""
        import numpy as np

        from ...merge import is_head_tensor

        _check_job(job)
        params = dict(job.base_model.named_parameters())
        extras = {n: np.zeros(shape, np.float32) if is_head_tensor(job.base_model, n)
                  else np.ascontiguousarray(params[n].detach().float().numpy())
                  for n, shape in signature["travelling"].items()}
        slot_shapes = {m: tuple(s) for m, s in signature["slots"].items()}
        base = _write_base(job, slot_shapes, extras, out)
        return {"lora_slots_spec": signature["slots_spec"], "lora_slots": len(slot_shapes), **base}

    def export_on_shared(self, job: ExportJob, shared: Path, shared_decisions: dict, out: Path,
                         progress=None) -> dict:
        """A bundle whose shared files are hard links to those at ``shared`` (held once on disk);
        its adapter files and ``web.json`` are its own."""
        _check_job(job)
        for rel in (MODEL_FILE, BASE_TENSORS, *web_files()):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(shared / rel, out / rel)
        _write_adapters(job, shared_decisions, out)
        return {**shared_decisions, "shared_base_graph": True}
