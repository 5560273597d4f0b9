"""The RMSNorm weights of the decoder LM graph (onnxruntime-genai's builder, see ``lm_exporter``)
as overridable inputs, so an adapter that trained norms (PEFT ``modules_to_save``, OpenDelta's
unfrozen modules) loads into any swappable artifact of its base.

The builder writes each Hugging Face RMSNorm weight as the scale initializer of one
``SimplifiedLayerNormalization`` or ``SkipSimplifiedLayerNormalization`` node named after it
(``/model/layers.3/input_layernorm/SkipLayerNorm``, ``/model/layers.3/attn/q_norm/…``; the final
``model.norm`` is ``/model/layers.L/final_norm_layernorm/…``). Each is found by that name, checked
by value against the PyTorch base, renamed to the Hugging Face parameter name and made a graph
input whose default is the builder's own value. The builder stores what its node multiplies by:
Gemma's RMSNorm computes ``x·(1+w)``, so its graph holds ``w+1`` and an adapter's trained ``w`` is
written as ``w+1`` too (:data:`NORM_OFFSETS`, checked against the stored values)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import BaseModelError

if TYPE_CHECKING:
    from ...job import ExportJob

#: architecture → what the builder stores for an RMSNorm weight ``w``: ``w + offset``
NORM_OFFSETS = {"Gemma3ForCausalLM": 1.0}
#: the scale input of each normalization op the builder emits
_SCALE_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn/)?(\w+)/[^/]+$")


def norm_sites(model, layers: int) -> dict[str, tuple[object, int]]:
    """Hugging Face norm parameter → (builder node, index of its scale input) in the onnx ``model``
    of a base with ``layers`` layers."""
    sites = {}
    for node in model.graph.node:
        m = _NODE.match(node.name)
        if node.op_type not in _SCALE_INPUT or not m:
            continue
        layer, attn, norm = m.groups()
        if norm == "final_norm_layernorm" and int(layer) == layers and not attn:
            name = "model.norm.weight"
        elif int(layer) < layers:
            name = f"model.layers.{layer}.{'self_attn.' if attn else ''}{norm}.weight"
        else:
            continue
        sites[name] = (node, _SCALE_INPUT[node.op_type])
    return sites


def graph_norms(job: ExportJob) -> list[str]:
    """The base's norm parameters the graph takes as inputs: every one with ``norms`` in the slots
    spec, and those the job's adapters carry whatever the spec."""
    from ...base_slots import norm_parameters

    every = norm_parameters(job.base_model, "norms")
    carried = {n for e in job.adapters for n in carried_names(e.pruned, job.base_model)}
    return [n for n in every if n in carried or n in norm_parameters(job.base_model, job.slots)]


def carried_names(adapters, base_model) -> dict[str, str]:
    """Hugging Face parameter name (as in ``base_model``) → the adapter's key, for every tensor
    the adapter carries besides LoRA."""
    params = dict(base_model.named_parameters())
    prefix = getattr(base_model, "base_model_prefix", "") or ""
    return {(k if k in params else f"{prefix}.{k}"): k for k in adapters.extra_tensors}


def carry_problems(adapters, base_model) -> list[str]:
    """Why an adapter's non-LoRA tensors cannot be inputs of the decoder graph (empty: they can)."""
    from ...base_slots import norm_parameters

    norms = set(norm_parameters(base_model, "norms"))
    params = dict(base_model.named_parameters())
    problems = []
    for name, key in carried_names(adapters, base_model).items():
        if name not in norms:
            problems.append(f"it carries {key}, which has no input in the decoder graph (inputs: LoRA factors "
                            "of the attention and MLP projections and the RMSNorm weights)")
        elif tuple(adapters.extra_tensors[key].shape) != tuple(params[name].shape):
            problems.append(f"{key} is {list(adapters.extra_tensors[key].shape)}, the base's is "
                            f"{list(params[name].shape)}")
    return problems


def add_norm_inputs(model, folder: Path, base_model, names: list[str]) -> dict[str, np.ndarray]:
    """Make each norm parameter in ``names`` an input of the onnx ``model`` (in place; its external
    data in ``folder``): the scale initializer of its builder node, checked against the base's
    value plus the architecture's offset, renamed to the parameter's name. Returns name → default
    (the builder's stored value)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    arch = type(base_model).__name__
    offset = NORM_OFFSETS.get(arch, 0.0)
    params = dict(base_model.named_parameters())
    sites = norm_sites(model, base_model.config.num_hidden_layers)
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    defaults = {}
    for name in names:
        node, index = sites.get(name, (None, 0))
        init = inits.get(node.input[index]) if node is not None and len(node.input) > index else None
        if init is None or init.data_type != TensorProto.FLOAT or readers[init.name] != 1:
            raise BaseModelError(f"the decoder graph has no normalization node of its own for {name} "
                                 f"({arch}): it cannot be an input")
        copy = TensorProto()
        copy.CopyFrom(init)  # to_array loads external data into the tensor it reads
        stored = numpy_helper.to_array(copy, str(folder))
        want = params[name].detach().to(torch.float64).numpy() + offset
        if stored.shape != want.shape or np.abs(stored - want).max() > 2 ** -7 * max(1.0, float(np.abs(want).max())):
            raise BaseModelError(f"the decoder graph's {node.name} does not hold {name}"
                                 f"{f' + {offset:g}' if offset else ''} ({arch}): it cannot be an input")
        init.name = node.input[index] = name
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(stored.shape)))
        defaults[name] = np.ascontiguousarray(stored, np.float32)
    return defaults


def norm_tensors(adapters, base_model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter's norm weights as the graph's inputs take them (``w + offset``), by parameter
    name; ``inputs`` are the graph's norm inputs (every carried tensor must be one)."""
    import torch

    offset = NORM_OFFSETS.get(type(base_model).__name__, 0.0)
    out = {}
    for name, key in carried_names(adapters, base_model).items():
        if name not in inputs:
            raise BaseModelError(f"tensor {key} of the adapter is not an input of the decoder graph")
        value = adapters.extra_tensors[key].detach().to(torch.float64).numpy() + offset
        out[name] = np.ascontiguousarray(value.reshape(inputs[name].shape), np.float32)
    return out
