"""Tiny synthetic adapters in each method's own checkpoint layout, for MiniLM shapes.

Written directly from the formulas in shared/adapter-formats.md (not through loradeploy), each
builder returns the expected ΔW per module computed by that formula, so the readers are checked
against an independent implementation. Many ranks are zeroed on purpose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER = 384, 1536
#: MiniLM linears adapted by the synthetic adapters: name → (out, in)
MODULES: dict[str, tuple[int, int]] = {
    "bert.encoder.layer.0.attention.self.query": (HIDDEN, HIDDEN),
    "bert.encoder.layer.0.attention.self.value": (HIDDEN, HIDDEN),
    "bert.encoder.layer.1.intermediate.dense": (INTER, HIDDEN),
    "bert.encoder.layer.1.output.dense": (HIDDEN, INTER),
    "bert.encoder.layer.5.attention.output.dense": (HIDDEN, HIDDEN),
}
#: this module ends with every rank zeroed (ΔW = 0): pruning must drop it
DEAD_MODULE = "bert.encoder.layer.5.attention.output.dense"


@dataclass
class Synthetic:
    path: Path
    delta: dict[str, torch.Tensor]  # expected ΔW (float64) per module
    live_ranks: dict[str, int]  # expected rank after exact pruning
    head: dict[str, torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(g, out_f, in_f, r):
    A = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=g) * 0.05
    return A, B


def _zero_pattern(g, name, r):
    """Per module, which ranks are zero: roughly half, all of them in DEAD_MODULE."""
    if name == DEAD_MODULE:
        return torch.zeros(r, dtype=torch.bool)
    live = torch.rand(r, generator=g) > 0.5
    live[0] = True
    return live


def _head(g, num_labels=2):
    return {"classifier.weight": torch.randn(num_labels, HIDDEN, generator=g) * 0.1,
            "classifier.bias": torch.randn(num_labels, generator=g) * 0.1}


def make_sora(folder: Path, r: int = 8, alpha: float = 16.0, seed: int = 0, fmt: str = "bin",
              write_config: bool = True, with_head: bool = True) -> Synthetic:
    g = _gen(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sd, delta, live = {}, {}, {}
    for name, (o, i) in MODULES.items():
        A, B = _factors(g, o, i, r)
        keep = _zero_pattern(g, name, r)
        gate = torch.where(keep, torch.randn(r, generator=g).sign() * (0.2 + torch.rand(r, generator=g)), 0.0)
        sd[f"{name}.lora.lora_A"], sd[f"{name}.lora.lora_B"] = A, B
        sd[f"{name}.lora.gate"] = gate.reshape(1, r)
        delta[name] = (alpha / r) * B.double() @ torch.diag(gate.double()) @ A.double()
        live[name] = int(keep.sum())
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_file(sd, str(folder / "model.safetensors"))
    if write_config:
        (folder / "lora_config.json").write_text(json.dumps({"lora_r": r, "lora_alpha": alpha}))
    head = _head(g) if with_head else {}
    if head:
        save_file(head, str(folder / "head.safetensors"))
    return Synthetic(folder, delta, live, head)


def make_increlora(folder: Path, alpha: float = 16.0, seed: int = 1, base_state: dict | None = None,
                   reserve: float = 0.0) -> Synthetic:
    """IncreLoRA: r0 = 1 then rank-1 entries; trailing reserve entries have E = ``reserve``
    (0.0 once the budget was reached, 1e-5 before). ``base_state``: write a full model."""
    g = _gen(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sd, delta, live = dict(base_state or {}), {}, {}
    for idx, (name, (o, i)) in enumerate(MODULES.items()):
        active = 0 if name == DEAD_MODULE else 1 + idx  # learned ranks
        n_entries = max(active, 1) + 1  # plus one reserve entry
        As, Bs, Es = [], [], []
        for k in range(n_entries):
            A, B = _factors(g, o, i, 1)
            E = torch.randn(1, 1, generator=g) if k < active else torch.full((1, 1), reserve)
            if name == DEAD_MODULE:
                E = torch.zeros(1, 1)
            sd[f"{name}.lora_A.{k}"], sd[f"{name}.lora_B.{k}"], sd[f"{name}.lora_E.{k}"] = A, B, E
            As.append(A), Bs.append(B), Es.append(E)
        ranknum = float(max(active, 1))
        sd[f"{name}.ranknum"] = torch.tensor([ranknum])
        A, B, E = torch.cat(As).double(), torch.cat(Bs, 1).double(), torch.cat(Es).double()
        delta[name] = B @ (A * E) * alpha / (ranknum + 1e-5)
        live[name] = active + (n_entries - max(active, 1) if reserve != 0 and name != DEAD_MODULE else 0)
    head = _head(g)
    sd.update(head)
    torch.save(sd, folder / "pytorch_model.bin")
    config = {"model_type": "bert", "apply_lora": True, "lora_type": "svd", "lora_alpha": alpha,
              "lora_r": 1, "lora_module": "query,key,value,intermediate,layer.output,attention.output"}
    (folder / "config.json").write_text(json.dumps(config))
    return Synthetic(folder, delta, live, head)


BLORA_THRESHOLD = -0.9353  # Bayesian Bits' test-time gate rule


def make_blora(folder: Path, r: int = 8, alpha: float = 16.0, seed: int = 2) -> Synthetic:
    g = _gen(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sd, delta, live = {}, {}, {}
    P = "base_model.model."
    for name, (o, i) in MODULES.items():
        A, B = _factors(g, o, i, r)
        E = torch.randn(r, 1, generator=g)
        n_open = 0 if name == DEAD_MODULE else int(torch.randint(1, r, (1,), generator=g))
        gamma_2 = torch.full((r - 1,), -3.0)
        gamma_2[:n_open] = 2.0
        if n_open + 1 < r - 1:
            gamma_2[n_open + 1] = 3.0  # open gate after a closed one: still off (nested)
        mask = torch.cat([torch.ones(1), torch.cumprod((gamma_2 > BLORA_THRESHOLD).double(), 0)])
        if name == DEAD_MODULE:
            E = torch.zeros(r, 1)
        sd[f"{P}{name}.lora_A"], sd[f"{P}{name}.lora_B"], sd[f"{P}{name}.lora_E"] = A, B, E
        sd[f"{P}{name}.lora_E_quantizer.quantizer.gamma_2"] = gamma_2
        for t, opens in (("lora_A", 2), ("lora_B", 1), ("lora_E", 4), ("lora_A_act", 3),
                         ("lora_E_act", 3), ("lora_AB_act", 3)):
            for j, bits in enumerate((4, 8, 16, 32)):
                sd[f"{P}{name}.{t}_quantizer.quantizer.gamma_{bits}"] = torch.tensor([3.0 if j < opens else -3.0])
        delta[name] = (alpha / r) * B.double() @ torch.diag(E.double().reshape(-1) * mask) @ A.double()
        live[name] = 0 if name == DEAD_MODULE else int(mask.sum())
    head = _head(g)
    sd.update({P + k: v for k, v in head.items()})
    save_file(sd, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "BLORA", "r": r, "lora_alpha": alpha, "task_type": "SEQ_CLS",
              "target_modules": ["query", "value", "dense"], "modules_to_save": ["classifier"],
              "quantize": True, "prune_rank": True, "n_bits": 32, "learn_gates": True}
    (folder / "adapter_model.safetensors").parent.joinpath("adapter_config.json").write_text(json.dumps(config))
    return Synthetic(folder, delta, live, head)


def with_layernorms(source: Path, folder: Path, base_model, norms: list[str], lora_scale: float = 1.0,
                    seed: int = 3, biases: tuple[str, ...] = ()) -> Path:
    """A PEFT adapter folder: the adapter at ``source`` (read and pruned exactly), its LoRA B
    multiplied by ``lora_scale``, plus trained-looking weights and biases for the LayerNorm
    modules ``norms`` of ``base_model`` (as PEFT's ``modules_to_save`` carries them) and trained
    biases of the linear layers ``biases`` (as PEFT's ``bias="lora_only"`` saves them)."""
    import dataclasses

    from loradeploy.adapters import peft as peft_format, read_adapter
    from loradeploy.prune import prune

    adapter, _ = prune(read_adapter(source))
    if lora_scale != 1.0:
        adapter = dataclasses.replace(adapter, modules={
            n: dataclasses.replace(m, lora_B=m.lora_B * lora_scale) for n, m in adapter.modules.items()})
    params = dict(base_model.named_parameters())
    g = _gen(seed)
    extras = dict(adapter.extra_tensors)
    for norm in norms:
        for kind in ("weight", "bias"):
            if f"{norm}.{kind}" not in params:  # RMSNorm: no bias
                continue
            p = params[f"{norm}.{kind}"].detach()
            extras[f"{norm}.{kind}"] = p * 1.3 + 0.1 * torch.randn(p.shape, generator=g)
    for linear in biases:
        p = params[f"{linear}.bias"].detach()
        extras[f"{linear}.bias"] = p + 0.2 * torch.randn(p.shape, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    peft_format.write(dataclasses.replace(adapter, extra_tensors=extras), folder)
    return folder
