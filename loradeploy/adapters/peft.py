"""PEFT LoRA and AdaLoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

LoRA: ``base_model.model.<m>.lora_A.weight [r,in]``, ``.lora_B.weight [out,r]``; scale
``alpha/r`` (``alpha/sqrt(r)`` with rsLoRA), r and alpha per module from ``rank_pattern`` and
``alpha_pattern``. AdaLoRA: ``lora_A``, ``lora_E [r,1]``, ``lora_B`` (no ``.weight``);
ΔW = B @ (A * E) · alpha / (init_r + 1e-5), since ``ranknum`` is not saved.

:func:`write` produces a plain PEFT LoRA folder from a pruned (gate-free) adapter.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from ..errors import AdapterFormatError
from ..ir import AdapterSet, LoraModule, Method, Task
from .checkpoint import Checkpoint, ReadOptions
from .common import blame, group_by_module, positive_integer, positive_number, rank_of, require

PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_[ABE])(\.weight)?$")
_UNSUPPORTED_KEYS = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
ADALORA_EPS = 1e-5

#: PEFT task types by our task (what ``PeftModel.from_pretrained`` wraps the model in).
PEFT_TASK_TYPES = {
    Task.SEQUENCE_CLASSIFICATION: "SEQ_CLS",
    Task.FEATURE_EXTRACTION: "FEATURE_EXTRACTION",
    Task.CAUSAL_LM: "CAUSAL_LM",
}


def _pattern_value(cfg_path, config: dict, field: str, name: str, default):
    """``config[field]`` (rank_pattern/alpha_pattern: module-name regex → value) for module
    ``name``, else ``default``."""
    from peft.utils.other import get_pattern_key

    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(cfg_path, f"{field} must be a JSON object, found {type(patterns).__name__}")
    try:
        key = get_pattern_key(list(patterns), name)
    except re.error as e:
        raise AdapterFormatError(cfg_path, f"{field}: a key is not a valid pattern ({e})") from e
    return patterns.get(key, default)


def _scale(cfg_path, config: dict, name: str, r: int, adalora: bool) -> float:
    alpha = positive_number(
        cfg_path, "lora_alpha", _pattern_value(cfg_path, config, "alpha_pattern", name, config.get("lora_alpha"))
    )
    if adalora:
        init_r = positive_number(cfg_path, "init_r", config.get("init_r"))
        return alpha / (init_r + ADALORA_EPS)
    if config.get("use_rslora"):
        return alpha / math.sqrt(r)
    return alpha / r


def read(ckpt: Checkpoint, options: ReadOptions) -> AdapterSet:
    path = ckpt.weights
    cfg_path = ckpt.configs["adapter_config.json"]
    config = ckpt.config("adapter_config.json")
    if options.lora_alpha is not None:
        config = {**config, "lora_alpha": options.lora_alpha, "alpha_pattern": {}}
    adalora = str(config.get("peft_type")).upper() == "ADALORA"
    if config.get("use_dora"):
        raise AdapterFormatError(cfg_path, "DoRA adapters (use_dora) are not supported")
    unsupported = [k for k in ckpt.tensors if any(u in k for u in _UNSUPPORTED_KEYS)]
    if unsupported:
        raise AdapterFormatError(path, f"unsupported PEFT tensor {unsupported[0]}")
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in ckpt.tensors.items()}
    groups = group_by_module(stripped, _KEY)
    modules = {}
    with blame(path):
        for name, parts in sorted(groups.items()):
            require(path, name, parts, ("lora_A", "lora_B", "lora_E") if adalora else ("lora_A", "lora_B"))
            r = rank_of(path, name, parts["lora_A"])
            expected_r = _pattern_value(cfg_path, config, "rank_pattern", name, config.get("r"))
            if not adalora and expected_r is not None and positive_integer(cfg_path, "r", expected_r) != r:
                raise AdapterFormatError(path, f"module {name}: rank {r} but adapter_config.json says {expected_r}")
            gate = parts.get("lora_E")
            if gate is not None and (gate.dim() != 2 or gate.shape[1] != 1):
                raise AdapterFormatError(path, f"module {name}: lora_E must be [r,1], got {list(gate.shape)}")
            modules[name] = LoraModule(
                name, parts["lora_A"], parts["lora_B"], _scale(cfg_path, config, name, r, adalora),
                gate=gate.reshape(-1) if gate is not None else None,
            )
        lora_keys = {k for k in stripped if _KEY.match(k)}
        extras = {k: t for k, t in stripped.items() if k not in lora_keys}
        notes = ["fan_in_fan_out: base weights are stored [in,out]; ΔW here is [out,in]"] if config.get("fan_in_fan_out") else []
        return AdapterSet(
            method=Method.PEFT_ADALORA if adalora else Method.PEFT_LORA,
            modules=modules,
            extra_tensors=extras,
            base_model_hint=config.get("base_model_name_or_path"),
            hyperparameters={k: config.get(k) for k in ("r", "lora_alpha", "init_r", "target_r",
                                                        "use_rslora", "task_type") if k in config},
            sources=ckpt.sources(),
            notes=notes,
            declared_task=declared_task(config),
        )


def declared_task(config: dict) -> Task | None:
    """The task a PEFT ``task_type`` names (None for types loradeploy does not export)."""
    by_type = {v: k for k, v in PEFT_TASK_TYPES.items()}
    return by_type.get(str(config.get("task_type") or "").upper())


def write(adapters: AdapterSet, out_dir: Path, task: Task | None = None,
          stored: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write ``adapters`` (gate-free, e.g. pruned) as a PEFT LoRA folder that
    ``peft.PeftModel.from_pretrained`` loads: one rank and alpha per module through
    ``rank_pattern``/``alpha_pattern`` with alpha_m = scale_m · r_m, so ΔW is unchanged.
    ``stored`` (``<module>.lora_A`` → tensor) replaces tensors by their planned precision
    (fp16/bf16; PEFT casts them to the model's dtype on load)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gated = [m.name for m in adapters.modules.values() if m.gate is not None or m.rank_mask is not None]
    if gated:
        raise ValueError(f"prune the adapter before writing PEFT LoRA (module {gated[0]} has gates)")
    modules = list(adapters.modules.values())
    ranks = {m.name: m.rank for m in modules}
    alphas = {m.name: m.scale * m.rank for m in modules}
    r_max = max(ranks.values())
    extra_modules = sorted({k.rsplit(".", 1)[0] for k in adapters.extra_tensors})
    task = task or adapters.task
    config = LoraConfig(
        r=r_max,
        lora_alpha=Counter(alphas.values()).most_common(1)[0][0],
        target_modules=sorted(ranks),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        modules_to_save=extra_modules or None,
        task_type=PEFT_TASK_TYPES[task],
        base_model_name_or_path=adapters.base_model_hint,
        lora_dropout=0.0,
        bias="none",
    )
    config.save_pretrained(str(out_dir))
    tensors = {}
    stored = stored or {}
    for m in modules:
        for role, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            tensors[f"{PREFIX}{m.name}.{role}.weight"] = stored.get(f"{m.name}.{role}", t).contiguous()
    for key, t in adapters.extra_tensors.items():
        tensors[f"{PREFIX}{key}"] = t.contiguous()
    weights = Path(out_dir) / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return [Path(out_dir) / "adapter_config.json", weights]
