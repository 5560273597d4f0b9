"""A causal LM as an ExecuTorch KV-cache program (PyTorch side): the Hugging Face model with a static
KV cache held in the program's mutable buffers, every LoRA slot's factors method inputs padded to
the rank bound. One ``forward`` method serves prefill and decode: ``input_ids [1, seq]`` (seq
dynamic, 1 … cache − 1) at ``cache_position [seq]`` (the positions the tokens take; a prompt
starts at 0, which also restarts the cache), then ``lora_A``/``lora_B`` per slot; it returns the
logits ``[1, seq, vocab]``. Lowered with the XNNPACK partitioner. Imported only while exporting.

Why our own wrapper and not ``transformers.integrations.executorch``'s: under non-strict
``torch.export`` (transformers 5.25, torch 2.13) its ``StaticCache`` tensors are reached through
the cache object, not the module, so they trace as constants that the graph mutates and ExecuTorch's
edge lowering fails ("expected compiled_fn to be GraphModule"); here the cache layers are pointed
at the module's own buffers at the start of every call, so they export as mutable buffers."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import LoradeployError
from ...traced_graph import LoraSlot, replace_module


class _BatchedLoraSlot(LoraSlot):
    """The slot's two products as batched matmuls with the factors expanded over the batch:
    XNNPACK's partitioner takes a bmm of two activations, not an mm whose weight is an input
    (measured: 28 portable mm on the tiny Llama otherwise)."""

    def forward(self, x):
        a, b = self.factors
        n = x.shape[0]
        return self.base(x) + torch.bmm(torch.bmm(x, a.expand(n, -1, -1)), b.expand(n, -1, -1))


class _RmsNorm(torch.nn.Module):
    """An RMSNorm whose mean of squares is a linear layer with a constant ``1/d`` weight: XNNPACK
    takes that, where it leaves a ``mean`` over the last axis of a 3-D tensor to the portable
    kernels, splitting the delegated graph around every norm (109 splits in Gemma 3 270M).
    ``offset`` 1: Gemma's ``x̂·(1 + w)``; 0: Llama's ``w·x̂``."""

    def __init__(self, norm: torch.nn.Module, eps: float, offset: float):
        super().__init__()
        self.weight, self.eps, self.offset = norm.weight, eps, offset
        d = norm.weight.shape[-1]
        self.register_buffer("mean_weight", torch.full((1, d), 1.0 / d), persistent=False)

    def forward(self, x):
        normed = x * torch.rsqrt(torch.nn.functional.linear(x * x, self.mean_weight) + self.eps)
        return normed * (self.offset + self.weight)


def delegable_norms(model: torch.nn.Module) -> int:
    """Every fp32 RMSNorm of ``model`` (a module with a 1-D ``weight`` and ``eps`` or
    ``variance_epsilon`` whose output on a probe equals one of the two forms of :class:`_RmsNorm`
    within 1e-5) replaced by :class:`_RmsNorm`; how many."""
    gen = torch.Generator().manual_seed(0)
    found = []
    for name, module in model.named_modules():
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        weight = getattr(module, "weight", None)
        if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
                or weight.dtype != torch.float32 or "RMSNorm" not in type(module).__name__:
            continue
        probe = torch.randn(2, 3, weight.shape[0], generator=gen)
        with torch.no_grad():
            want = module(probe)
            for offset in (0.0, 1.0):
                if torch.allclose(_RmsNorm(module, eps, offset)(probe), want, atol=1e-5, rtol=1e-5):
                    found.append((name, _RmsNorm(module, eps, offset)))
                    break
    for name, norm in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, norm)
    return len(found)


class _TanhGelu(torch.nn.Module):
    """GELU's tanh approximation written out: ExecuTorch's XNNPACK lowering computes
    ``gelu(approximate="tanh")`` as the erf GELU (measured: up to 4.7e-4 apart on N(0, 9) inputs;
    Gemma's MLPs use the tanh form); tanh, mul and add are delegated as they are."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def explicit_tanh_gelus(model: torch.nn.Module) -> int:
    """Every activation module of ``model`` that computes GELU's tanh approximation (checked on a
    probe) replaced by :class:`_TanhGelu`; how many."""
    probe = torch.linspace(-8, 8, 4001)
    want = torch.nn.functional.gelu(probe, approximate="tanh")
    found = [name for name, module in model.named_modules() if "GELU" in type(module).__name__.upper()
             and not list(module.parameters()) and torch.allclose(module(probe), want, atol=1e-6)]
    for name in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _TanhGelu())
    return len(found)


class KvCacheDecoder(torch.nn.Module):
    """``model`` (a Hugging Face causal LM, batch 1) with a static KV cache of ``max_cache``
    positions and LoRA slots on ``slots`` (module names in ``model``)."""

    def __init__(self, model, slots: list[str], max_cache: int):
        from transformers.cache_utils import StaticCache, StaticLayer
        from transformers.integrations.executorch import get_head_shapes

        super().__init__()
        self.model = model
        self.norms = delegable_norms(model)
        self.gelus = explicit_tanh_gelus(model)
        self.slots = [replace_module(model, name, _BatchedLoraSlot) for name in slots]
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_cache, config=config)
        # every layer keeps the whole cache (a sliding-window layer's ring buffer has data-dependent
        # control flow); the model's masks still apply each layer's window
        self.cache.layers = [StaticLayer(max_cache) for _ in self.cache.layers]
        heads, head_dim = get_head_shapes(config)
        self.cache.early_initialization(1, heads, head_dim, torch.float32, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys.clone(), persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values.clone(), persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length.clone(), persistent=False)

    def forward(self, input_ids, cache_position, *factors):
        for i, slot in enumerate(self.slots):
            slot.factors = (factors[2 * i], factors[2 * i + 1])
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cache_length_{i}")
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, attention_mask=None, cache=self.cache, use_cache=True).logits


def lower_decoder(module: KvCacheDecoder, factors: list[torch.Tensor], max_cache: int, arch: str, path: Path) -> dict:
    """Export ``module`` with a dynamic token axis, lower it to XNNPACK and write it to ``path``;
    what the partitioner did. A model torch.export cannot trace is one :class:`LoradeployError`
    naming the architecture and torch.export's first line."""
    import warnings

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim

    from .program import partition_summary

    module.model.requires_grad_(False)
    ids = torch.full((1, 6), 3, dtype=torch.long)
    seq = Dim("seq", min=1, max=max_cache - 1)
    # torch.export sees ``*factors`` as one tuple input (absent when there are none): fixed shapes
    shapes = ({1: seq}, {0: seq}) + (((None,) * len(factors),) if factors else ())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(were assigned during export|requires gradient)")
            exported = torch.export.export(module.eval(), (ids, torch.arange(6), *factors), dynamic_shapes=shapes,
                                           strict=False)
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    except Exception as e:  # noqa: BLE001  torch.export's / the lowering's refusal names what it cannot take
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoradeployError(f"ExecuTorch cannot export a {arch} KV-cache decoder: {first}") from e
    mutated = set(edge.exported_program().graph_signature.buffers_to_mutate.values())
    unwritten = [n for n, _ in module.named_buffers() if n.startswith("key_cache_") and n not in mutated]
    if unwritten:
        raise LoradeployError(f"ExecuTorch cannot export a {arch} KV-cache decoder: the model does not write "
                              f"transformers' static KV cache ({unwritten[0]} is never updated)")
    summary = partition_summary(edge.exported_program().graph_module)
    program = edge.to_executorch()
    with open(path, "wb") as f:
        program.write_to_file(f)
    return summary
