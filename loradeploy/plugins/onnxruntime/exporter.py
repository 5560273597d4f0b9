"""ONNX Runtime target: merged graphs, or swappable graphs whose LoRA weights are graph inputs.

Swappable layout (Olive's ``ExtractAdapters`` convention): each adapted linear ``P`` computes
``P(x) + (x @ P.lora_A) @ P.lora_B`` with ``P.lora_A [in, r]`` and ``P.lora_B [r, out]`` (scale
and rank gates folded into it) as **graph inputs with empty rank-0 defaults**, so the graph
runs as the base when no adapter is active. The rank dimension of every module is its own
dynamic axis, so pruned adapters with different ranks per module — and different adapters
with different ranks — all fit one graph without padding. Tensors that travel with an adapter
are overridable inputs too: a classifier head (default: the first adapter's), every LayerNorm's
weight and bias with the default slots (``norms``; default: the base's), and whatever an exported
adapter carries, so any adapter of the base loads into any such graph. Every
adapter is one ``.onnx_adapter`` file (onnxruntime ``AdapterFormat``), activated per run with
``RunOptions.add_active_adapter``.

The base is quantized with onnxruntime's own tools (``quantize_dynamic``, ``MatMulNBitsQuantizer``);
nodes that read an overridable input are excluded, so LoRA paths stay fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import LoradeployError
from ...fsutil import link_or_copy
from ...manifest import ADAPTER_DIR
from ...targets.common import Target
from . import MODEL_FILE
from .adapter_tensors import lora_inputs, lora_slot_decisions, slot_formats, write_adapter_file

if TYPE_CHECKING:
    from ...job import ExportJob

log = logging.getLogger(__name__)

INT4_BLOCK = 32


def _set_defaults(path: Path, defaults: dict[str, np.ndarray]) -> None:
    """Give overridable graph inputs a default value (an initializer of the same name)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    present = {i.name for i in model.graph.initializer}
    for name, arr in defaults.items():
        if name not in present:
            model.graph.initializer.append(numpy_helper.from_array(arr, name))
    onnx.save(model, str(path))


def _pop_defaults(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Remove the defaults of overridable inputs from the graph at ``path`` and return them.
    The quantizers treat an input with an initializer as a constant (quantize_dynamic folds a
    Gemm's transposed weight into a new initializer, leaving the input unused and dropping it),
    so they see plain inputs; :func:`_set_defaults` puts the defaults back."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    kept, popped = [], {}
    for init in model.graph.initializer:
        (popped.__setitem__(init.name, numpy_helper.to_array(init)) if init.name in names else kept.append(init))
    if popped:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        onnx.save(model, str(path))
    return popped


def _nodes_reading(path: Path, inputs: set[str]) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [n.name for n in model.graph.node if inputs.intersection(n.input)]
    # quantize_dynamic first rewrites a Gemm as MatMul + Add, naming the MatMul NAME_MatMul: the
    # exclusion must name that too, or a head read from an overridable input is quantized away
    gemms = [f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm" and n.name in names]
    return names + gemms


def fuse_transformer(src: Path, dst: Path, config) -> bool:
    """onnxruntime's offline transformer fusions (Attention, SkipLayerNorm, BiasGelu …) so
    that quantization sees fused ops; only for graphs without overridable inputs."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    if config.model_type not in MODEL_TYPES:
        return False
    with _quiet_logs():
        optimize_model(str(src), model_type=config.model_type, num_heads=getattr(config, "num_attention_heads", 0),
                       hidden_size=getattr(config, "hidden_size", 0)).save_model_to_file(str(dst))
    return True


class _quiet_logs:
    """onnxruntime's python tools log advice at WARNING (root logger included) on every call."""

    def __enter__(self):
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(self._level)


def quantize(src: Path, dst: Path, precision: str, exclude: list[str]) -> None:
    """Quantize the base with onnxruntime's tools; ``exclude`` nodes (LoRA paths) stay fp32."""
    import onnx

    if precision == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=exclude,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=INT4_BLOCK, is_symmetric=True,
                                 nodes_to_exclude=exclude)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise LoradeployError(f"precision {precision!r} is not supported by the ONNX target")


def _eager_attention(model):
    from ...traced_graph import eager_attention

    return eager_attention(model)


class OnnxTarget(Target):
    """Writes merged or swappable ONNX artifacts (loaded by :mod:`loradeploy.plugins.onnxruntime.session`)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        from ...ir import Task

        if job.task is Task.CAUSAL_LM:
            from .lm_exporter import export_lm

            return export_lm(job, out, progress)
        if job.profile.precision == "gguf":
            raise LoradeployError(f"profile {job.profile.name} keeps a GGUF base's own blocks: it exports causal LMs "
                                  f"on a GGUF base, not a {job.task.value} model")
        fp32 = out / ("model.fp32.onnx" if job.profile.precision != "fp32" else MODEL_FILE)
        lora_formats: dict[str, str] = {}
        decisions: dict = {}
        if job.mode == "merged":
            overridable = self._export_merged(job, fp32)
        else:
            overridable, lora_formats, slot_shapes = self._export_swappable(job, fp32, out)
            decisions.update(lora_slot_decisions(job.slots, slot_shapes))
            decisions["norm_inputs"] = _norm_inputs(job, overridable)
        decisions.update(self._finish_base(job, fp32, out, overridable))
        if any(fmt != "fp32" for fmt in lora_formats.values()):
            counts: dict[str, int] = {}
            for fmt in lora_formats.values():
                counts[fmt] = counts.get(fmt, 0) + 1
            decisions["lora_precision"] = dict(sorted(counts.items()))
            decisions["lora_input_formats"] = dict(sorted(lora_formats.items()))
        return decisions

    def _finish_base(self, job: ExportJob, fp32: Path, out: Path, overridable: set[str]) -> dict:
        """The fp32 graph at ``fp32`` into ``out/model.onnx`` at the profile's precision (nodes
        reading an overridable input stay fp32); what was decided."""
        decisions = {"graph_inputs_overridable": sorted(overridable), "fused_offline": False}
        if job.profile.precision != "fp32":
            src = fp32
            if not overridable:
                fused = out / "model.fused.onnx"
                if fuse_transformer(fp32, fused, job.base_model.config):
                    decisions["fused_offline"], src = True, fused
            defaults = _pop_defaults(src, overridable)
            with _quiet_logs():
                quantize(src, out / MODEL_FILE, job.profile.precision, _nodes_reading(src, overridable))
            _set_defaults(out / MODEL_FILE, defaults)
            for tmp in (fp32, out / "model.fused.onnx"):
                tmp.unlink(missing_ok=True)
        decisions.update(self._precision_summary(out / MODEL_FILE, job.profile.precision, overridable))
        return decisions

    # --- one base graph shared by many single-adapter artifacts (loradeploy.fleet) -----------

    def shared_base(self, job: ExportJob) -> dict | None:
        """What a swappable encoder graph depends on besides the base and profile — its LoRA
        slots and the names and shapes of the tensors that travel with the adapter — or None
        when the graph depends on the adapter's values (a precision plan stores its slots in
        the plan's formats; causal LMs go through the decoder builder)."""
        from ...ir import Task
        from ...base_slots import choose as choose_slots

        if job.mode != "swappable" or job.task is Task.CAUSAL_LM or job.profile.precision == "gguf" \
                or any(e.quantized is not None for e in job.adapters):
            return None
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        extras = travelling_defaults(job)
        return {"slots_spec": job.slots, "slots": {m: list(s) for m, s in slot_shapes.items()},
                "travelling": {n: list(a.shape) for n, a in extras.items()}}

    def export_shared(self, job: ExportJob, signature: dict, out: Path, progress=None) -> dict:
        """The base graph of ``signature`` (see :meth:`shared_base`) into ``out``, holding no
        adapter: every LoRA input defaults to rank 0, a travelling tensor to the base's own
        value and the task head to zeros (the base has no trained head, and a shared graph
        must not depend on which adapter came first)."""
        import copy

        from ...merge import is_head_tensor
        from ...traced_graph import GraphModule, export_graph

        params = dict(job.base_model.named_parameters())
        slot_shapes = {m: tuple(s) for m, s in signature["slots"].items()}
        extras = {n: np.zeros(shape, np.float32) if is_head_tensor(job.base_model, n)
                  else np.ascontiguousarray(params[n].detach().float().numpy())
                  for n, shape in signature["travelling"].items()}
        fp32 = out / ("model.fp32.onnx" if job.profile.precision != "fp32" else MODEL_FILE)
        module = GraphModule(_eager_attention(copy.deepcopy(job.base_model)), job.task, list(slot_shapes), list(extras))
        export_graph(module, slot_shapes, extras, fp32, job.profile.options["opset"])
        formats = {f"{q}.{role}": ("fp32", role, n) for q, (i, o) in slot_shapes.items()
                   for role, n in (("lora_A", i), ("lora_B", o))}
        defaults = dict(extras)
        from .lora_inputs import default_arrays

        for name, (fmt, role, n) in formats.items():
            defaults.update(default_arrays(name, role, fmt, n))
        _set_defaults(fp32, defaults)
        decisions = lora_slot_decisions(signature["slots_spec"], slot_shapes)
        decisions["norm_inputs"] = _norm_inputs(job, set(extras))
        decisions.update(self._finish_base(job, fp32, out, set(defaults) | set(formats)))
        return decisions

    def export_on_shared(self, job: ExportJob, shared: Path, shared_decisions: dict, out: Path,
                         progress=None) -> dict:
        """A swappable artifact whose graph is the shared one at ``shared`` (hard-linked, so
        every artifact of the fleet holds the same file once on disk) and whose adapter files
        are the job's own."""
        from ...merge import find_module
        from ...traced_graph import adapter_inputs

        link_or_copy(shared / MODEL_FILE, out / MODEL_FILE)
        qualified = {name: find_module(job.base_model, name)[0] for e in job.adapters for name in e.pruned.modules}
        (out / ADAPTER_DIR).mkdir()
        for entry in job.adapters:
            tensors = adapter_inputs(entry.pruned, qualified, job.base_model)
            write_adapter_file(tensors, out / ADAPTER_DIR / f"{entry.name}.onnx_adapter")
        return {**shared_decisions, "shared_base_graph": True}

    def _export_merged(self, job: ExportJob, path: Path) -> set[str]:
        import copy

        from ...merge import merge_into
        from ...traced_graph import GraphModule, export_graph

        (entry,) = job.adapters
        model = merge_into(_eager_attention(copy.deepcopy(job.base_model)), entry.pruned)
        export_graph(GraphModule(model, job.task, [], []), {}, {}, path, job.profile.options["opset"])
        return set()

    def _export_swappable(self, job: ExportJob, path: Path, out: Path) -> tuple[set[str], dict[str, str], dict]:
        """The graph with LoRA inputs for every slot (:mod:`loradeploy.slots`; stored as the
        adapters' plans need) and one adapter file each; returns the overridable input names,
        the format of every LoRA input and the slots (module → (in, out))."""
        import copy

        import onnx

        from ...merge import find_module
        from ...base_slots import choose as choose_slots
        from ...traced_graph import GraphModule, export_graph, extra_inputs, lora_factors
        from .lora_inputs import default_arrays, lower_inputs

        qualified = {name: find_module(job.base_model, name)[0] for e in job.adapters for name in e.pruned.modules}
        slot_shapes = choose_slots(job.base_model, [e.pruned for e in job.adapters], job.slots)
        extras = travelling_defaults(job)
        module = GraphModule(_eager_attention(copy.deepcopy(job.base_model)), job.task, list(slot_shapes), list(extras))
        export_graph(module, slot_shapes, extras, path, job.profile.options["opset"])
        formats = slot_formats(job, qualified, slot_shapes)
        if any(f != "fp32" for f, _, _ in formats.values()):
            model = onnx.load(str(path))
            lower_inputs(model, formats)
            onnx.save(model, str(path))
        defaults = dict(extras)
        for name, (fmt, role, n) in formats.items():
            defaults.update(default_arrays(name, role, fmt, n))
        _set_defaults(path, defaults)
        (out / ADAPTER_DIR).mkdir()
        for entry in job.adapters:
            if entry.quantized is None:
                tensors = lora_factors(entry.pruned, qualified)
            else:
                tensors = lora_inputs(entry, qualified, formats)
            tensors.update(extra_inputs(entry.pruned, job.base_model))
            write_adapter_file(tensors, out / ADAPTER_DIR / f"{entry.name}.onnx_adapter")
        return set(defaults) | set(formats), {name: fmt for name, (fmt, _, _) in formats.items()}, slot_shapes

    @staticmethod
    def _precision_summary(path: Path, precision: str, overridable: set[str]) -> dict:
        import onnx

        model = onnx.load(str(path))
        dtypes: dict[str, int] = {}
        per_tensor: dict[str, str] = {}
        for init in model.graph.initializer:
            kind = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
            per_tensor[init.name] = kind
            if init.name not in overridable:
                dtypes[kind] = dtypes.get(kind, 0) + int(np.prod(init.dims))
        ops = sorted({n.op_type for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "QAttention", "Attention")})
        return {"base_precision": precision, "base_parameters_by_dtype": dtypes, "quantized_ops": ops,
                "lora_precision": "float32", "rank_dimension": "dynamic per module",
                "tensor_precision": dict(sorted(per_tensor.items()))}


def _norm_inputs(job: ExportJob, overridable: set[str]) -> int:
    """How many normalization parameters of the base the graph takes as overridable inputs."""
    from ...base_slots import norm_parameters

    return len(set(norm_parameters(job.base_model, "norms")) & overridable)


def travelling_defaults(job: ExportJob) -> dict[str, np.ndarray]:
    """The job's travelling tensors with their defaults (:func:`loradeploy.traced_graph.travelling_tensors`)."""
    from ...traced_graph import travelling_tensors

    return travelling_tensors(job.base_model, [e.pruned for e in job.adapters], job.slots)
