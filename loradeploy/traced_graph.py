"""The encoder traced to an ONNX graph with its LoRA slots as inputs (PyTorch side, shared by the
plugins that write ONNX graphs: onnxruntime's swappable artifacts, the web bundle): LoRA factors
and the tensors that travel with adapters (a classifier head, LayerNorm weights, embeddings) are
extra inputs, so they become graph inputs. ``torch.onnx`` writes the file; no runtime package is
imported here. Imported only while exporting."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import LoradeployError
from .ir import AdapterSet, Task

INPUTS = ("input_ids", "attention_mask")
OUTPUT = {Task.SEQUENCE_CLASSIFICATION: "logits", Task.FEATURE_EXTRACTION: "sentence_embedding"}


class LoraSlot(torch.nn.Module):
    """A linear layer plus a LoRA path whose factors are set per call (traced as inputs)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x):
        a, b = self.factors
        return self.base(x) + torch.matmul(torch.matmul(x, a), b)


def replace_module(model: torch.nn.Module, name: str, factory):
    """The submodule ``name`` of ``model`` replaced by ``factory(it)``; the new module."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    new = factory(getattr(owner, child))
    setattr(owner, child, new)
    return new


class GraphModule(torch.nn.Module):
    """What gets exported: the task output from token ids, with LoRA factors and adapter
    tensors (head) taken as extra inputs."""

    def __init__(self, model, task: Task, slots: list[str], extras: list[str]):
        super().__init__()
        self.model, self.task, self.extras = model, task, extras
        self.slots = [replace_module(model, name, LoraSlot) for name in slots]
        self.owners = []
        for param in extras:  # any parameter (head, LayerNorm, embeddings): set per call, traced as an input
            module_name, _, kind = param.rpartition(".")
            owner = model.get_submodule(module_name)
            if isinstance(owner, LoraSlot):  # a bias trained beside LoRA (PEFT bias="lora_only"/"all")
                owner = owner.base
            if kind not in owner._parameters:
                raise LoradeployError(f"tensor {param} travels with the adapter but is not a parameter of the base")
            del owner._parameters[kind]
            self.owners.append((owner, kind))

    def forward(self, input_ids, attention_mask, *tensors):
        for i, slot in enumerate(self.slots):
            slot.factors = (tensors[2 * i], tensors[2 * i + 1])
        for (owner, kind), value in zip(self.owners, tensors[2 * len(self.slots):]):
            setattr(owner, kind, value)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.task is Task.SEQUENCE_CLASSIFICATION:
            return out.logits
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def lora_factors(adapters: AdapterSet, qualified: dict[str, str]) -> dict[str, np.ndarray]:
    """The graph-input tensors of an adapter: ``P.lora_A = Aᵀ [in,r]``, ``P.lora_B = (s·B·g)ᵀ [r,out]``."""
    out = {}
    for name, m in adapters.modules.items():
        q = qualified[name]
        b = m.folded_b().T
        out[f"{q}.lora_A"] = np.ascontiguousarray(m.lora_A.to(torch.float32).T.numpy())
        out[f"{q}.lora_B"] = np.ascontiguousarray(b.to(torch.float32).numpy())
    return out


def extra_inputs(adapters: AdapterSet, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Tensors travelling with the adapter, keyed by their parameter name in ``model`` (the
    unmodified base)."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key, t in adapters.extra_tensors.items():
        name = key if key in params else f"{prefix}.{key}"
        out[name] = np.ascontiguousarray(t.to(torch.float32).numpy())
    return out


def adapter_inputs(adapters: AdapterSet, qualified: dict[str, str], model: torch.nn.Module,
                   inputs: set[str] | None = None, source: object = "", where: str = "graph") -> dict[str, np.ndarray]:
    """Every input tensor of an adapter: its LoRA factors and the tensors travelling with it. With
    ``inputs`` (the names the artifact takes), a tensor it has no input for is refused in one line
    naming ``source`` (the adapter's checkpoint) and the tensor."""
    tensors = lora_factors(adapters, qualified)
    tensors.update(extra_inputs(adapters, model))
    unknown = sorted(set(tensors) - inputs) if inputs is not None else []
    if unknown:
        raise LoradeployError(f"{source}: tensor {unknown[0]} has no input in the {where}")
    return tensors


def export_graph(module: GraphModule, slot_shapes: dict[str, tuple[int, int]],
                  extras: dict[str, np.ndarray], path: Path, opset: int) -> None:
    ids = torch.ones(2, 16, dtype=torch.long)
    example, names = [ids, torch.ones_like(ids)], list(INPUTS)
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    for q, (in_f, out_f) in slot_shapes.items():
        example += [torch.zeros(in_f, 2), torch.zeros(2, out_f)]
        names += [f"{q}.lora_A", f"{q}.lora_B"]
        axes[f"{q}.lora_A"], axes[f"{q}.lora_B"] = {1: f"rank_{q}"}, {0: f"rank_{q}"}
    for name, arr in extras.items():
        example.append(torch.from_numpy(arr.copy()))
        names.append(name)
    output = OUTPUT[module.task]
    axes[output] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example), str(path), dynamo=False, input_names=names,
                          output_names=[output], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)


def eager_attention(model):
    """Trace attention as explicit MatMul/Softmax, the pattern onnxruntime fuses into its
    Attention kernel (the SDPA form exports as ops it does not fuse)."""
    model.set_attn_implementation("eager")
    return model


def travelling_tensors(model: torch.nn.Module, adapters: list[AdapterSet], slots: str) -> dict[str, np.ndarray]:
    """The graph inputs for every non-LoRA tensor that can travel with an adapter of this base,
    with their defaults (what runs when an adapter does not carry one, or none is active):
    whatever any of ``adapters`` carries, the normalization parameters the slots spec asks for
    (``norms``, :func:`loradeploy.base_slots.norm_parameters`) and the task head. The default is
    the base's own value, except for the task head, which the base does not have trained — the
    first adapter's head that has one is the default there."""
    from .base_slots import norm_parameters
    from .merge import is_head_tensor

    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    for adapter in adapters:
        for name, arr in extra_inputs(adapter, model).items():
            if name in out:
                continue
            out[name] = arr if is_head_tensor(model, name) else np.ascontiguousarray(params[name].detach().float().numpy())
    for name in norm_parameters(model, slots) + [n for n in params if is_head_tensor(model, n)]:
        if name not in out:
            out[name] = np.ascontiguousarray(params[name].detach().float().numpy())
    return dict(sorted(out.items()))
