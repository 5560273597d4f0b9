"""The encoder as an ExecuTorch program (PyTorch side): for a quantized profile the base's linear
layers through torchao's ``quantize_`` (XNNPACK's dynamic-int8-activation schemes), then
``torch.export`` with a dynamic batch and sequence axis, ``to_edge_transform_and_lower`` with the
XNNPACK partitioner, ``to_executorch``, written as one ``.pte``. Method inputs: ``input_ids``,
``attention_mask`` (int64 ``[batch, seq]``), then any extra tensors in the order given (LoRA factor
pairs with a bounded dynamic rank axis each, then fixed shapes). Imported only while exporting."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ...errors import LoradeployError

#: the shortest sequence the program takes: every tokenized text has [CLS] and [SEP]
MIN_SEQ = 2
#: quantized profile precision → (weight bits, group size; 0: one scale per output channel);
#: activations are quantized to int8 per token at run time (torchao's 8da8w)
QUANTIZED = {"int8-dynamic": (8, 0)}


def linear_slots(module) -> int:
    """Each LoRA slot of ``module`` (a :class:`loradeploy.traced_graph.GraphModule`) computes its
    two products as linear layers whose weights are the factors, ``linear(linear(x, Aᵀ), Bᵀ)``:
    with :func:`partitioner` XNNPACK runs them as fully-connected operators with dynamic weights,
    inside the segments around them (an ``mm`` whose weight is a method input is left to the
    portable kernels; a ``bmm`` with the factors expanded over the batch leaves one portable
    ``expand_copy`` per factor). How many slots."""
    for slot in module.slots:
        slot.__class__ = _linear(type(slot))
    return len(module.slots)


@functools.cache
def _linear(cls):
    import torch

    class LinearLoraSlot(cls):
        def forward(self, x):
            a, b = self.factors
            return self.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, a.t()), b.t())
    return LinearLoraSlot


def partitioner():
    """XNNPACK's partitioner, whose linear config also takes an fp32 linear layer whose weight is
    not a constant of the program (a LoRA factor, a method input): XNNPACK's fully-connected
    operator then reads its weights at run time."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.utils import get_input_node, is_param_node

    class InputWeightLinearConfig(LinearConfig):
        def _get_weight_deps(self, node, ep, precision):
            if precision == ConfigPrecisionType.FP32 and not is_param_node(ep, get_input_node(node, self.weight_idx)):
                return True, []
            return super()._get_weight_deps(node, ep, precision)

    return XnnpackPartitioner(configs=[InputWeightLinearConfig if c is LinearConfig else c
                                       for c in ALL_PARTITIONER_CONFIGS])


def quantize_linears(module, precision: str, keep) -> list[str]:
    """The linear layers of ``module`` whose weight is a parameter (a slot's LoRA factors and
    a travelling head are method inputs, so they stay fp32) quantized in place with torchao's
    ``Int8DynamicActivationIntxWeightConfig``, except those ``keep(name)`` holds; their names."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    bits, group = QUANTIZED[precision]
    chosen: list[str] = []

    def fits(mod, name: str) -> bool:
        ok = isinstance(mod, torch.nn.Linear) and "weight" in mod._parameters and not keep(name) \
            and (group == 0 or mod.in_features % group == 0)
        if ok:
            chosen.append(name)
        return ok

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                                   weight_granularity=PerAxis(0) if group == 0 else PerGroup(group))
    with torch.no_grad():
        quantize_(module, config, filter_fn=fits)
    return chosen


def lower_to_pte(module, extras: list[np.ndarray], max_batch: int, max_seq: int, path: Path,
                 rank_bounds: list[int] = ()) -> dict:
    """Export ``module(input_ids, attention_mask, *extras)`` and write it to ``path``; what the
    partitioner did (delegated segments, operators left to the portable kernels). The first
    ``2 * len(rank_bounds)`` extras are LoRA slots' factor pairs ``A [in, r]``, ``B [r, out]``
    (given at their bound): slot i's rank axis is dynamic, 1 to ``rank_bounds[i]`` (fixed where
    the bound is 1); every other extra has a fixed shape."""
    import warnings

    import torch
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=max_batch), Dim("seq", min=MIN_SEQ, max=max_seq)
    ids = torch.ones(2, 16, dtype=torch.long)
    example = (ids, torch.ones_like(ids), *(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in extras))
    extra_shapes: list[dict | None] = []
    for i, bound in enumerate(rank_bounds):
        rank = Dim(f"rank_{i}", min=1, max=bound) if bound > 1 else None
        extra_shapes += [{1: rank}, {0: rank}] if rank is not None else [None, None]
    extra_shapes += [None] * (len(extras) - len(extra_shapes))
    # torch.export sees ``*tensors`` as one tuple input: its shapes nest likewise
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}) + ((tuple(extra_shapes),) if extras else ())
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the travelling tensors are set as attributes per call, by design (traced as inputs)
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            exported = torch.export.export(module.eval(), example, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001  torch.export's refusal names what it cannot trace
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoradeployError(f"torch.export cannot export this encoder for ExecuTorch: {first}") from e
    edge = to_edge_transform_and_lower(exported, partitioner=[partitioner()])
    summary = partition_summary(edge.exported_program().graph_module)
    program = edge.to_executorch()
    with open(path, "wb") as f:
        program.write_to_file(f)
    return summary


def partition_summary(graph_module) -> dict:
    """How many XNNPACK segments the lowered graph calls, and which operators it runs outside them
    (with counts)."""
    delegated, portable = 0, {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            delegated += 1
        elif name != "getitem":
            portable[name] = portable.get(name, 0) + 1
    return {"xnnpack_segments": delegated, "portable_ops": dict(sorted(portable.items()))}
