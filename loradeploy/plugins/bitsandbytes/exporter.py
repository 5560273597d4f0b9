"""bitsandbytes target: a base quantized by bitsandbytes (nf4 / fp4 / int8) through transformers'
``BitsAndBytesConfig``, saved with ``save_pretrained`` (``quantization_config`` in config.json),
with the adapter merged in fp32 before quantization, or kept beside it as a PEFT LoRA folder
(QLoRA-style). The artifact loads with plain transformers (+ peft) and no loradeploy:

    model = AutoModelForSequenceClassification.from_pretrained(OUT)          # or ForCausalLM
    model = PeftModel.from_pretrained(model, OUT / "adapters" / NAME)        # swappable only

Task heads that travel with an adapter stay fp32 (``llm_int8_skip_modules``). The model is
saved before it runs anything: on CPU, bitsandbytes 0.50 repacks a 4-bit weight in place on
its first forward pass, and a ``save_pretrained`` after that writes worse weights.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ...manifest import ADAPTER_DIR
from ...targets.common import Target

if TYPE_CHECKING:
    from ...job import ExportJob

FP32_TMP = ".fp32-staging"


def quantization_config(precision: str, double_quant: bool, skip: list[str]):
    import torch
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip or None)


def _head_modules(job: ExportJob) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for e in job.adapters for k in e.pruned.extra_tensors})


def _counts(formats: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for fmt in formats.values():
        out[fmt] = out.get(fmt, 0) + 1
    return out


def _planned(entry) -> dict | None:
    """The adapter's tensors in the precision its plan gives (fp32 / fp16 / bf16)."""
    import torch

    if entry.quantized is None:
        return None
    out = {}
    for key, q in entry.quantized.stored.items():
        if "values_bf16" in q.payload:
            out[key] = torch.from_numpy(q.payload["values_bf16"].copy()).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(q.payload["values"].copy())
    return out


class BnbTarget(Target):
    """Writes a bitsandbytes-quantized transformers folder (+ PEFT adapter folders), loaded by
    :mod:`loradeploy.plugins.bitsandbytes.session` (or plain transformers + peft)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        from ...adapters import peft as peft_format
        from ...base import auto_class, load_tokenizer
        from ...merge import load_extras, merge_into

        staging = out / FP32_TMP
        model = copy.deepcopy(job.base_model)
        if job.mode == "merged":
            (entry,) = job.adapters
            merge_into(model, entry.pruned)
        else:
            # the first adapter's head in the base (it has none trained); every adapter carries its own
            # head and other tensors as PEFT modules_to_save, which leave the base's own values in place
            load_extras(model, job.adapters[0].pruned, heads_only=True)
        model.save_pretrained(staging)
        del model
        skip = _head_modules(job)
        config = quantization_config(job.profile.precision, job.profile.options["double_quant"], skip)
        quantized = auto_class(job.task).from_pretrained(str(staging), quantization_config=config)
        quantized.save_pretrained(out)  # before any forward pass, see the module doc
        shutil.rmtree(staging)
        load_tokenizer(job.base_dir).save_pretrained(out)
        if job.mode == "swappable":
            (out / ADAPTER_DIR).mkdir()
            for entry in job.adapters:
                folder = out / ADAPTER_DIR / entry.name
                folder.mkdir()
                peft_format.write(entry.pruned, folder, task=job.task, stored=_planned(entry))
        precision = {e.name: dict(sorted(_counts(e.quantized.formats).items())) if e.quantized else {"fp32": "all"}
                     for e in job.adapters} if job.mode == "swappable" else "merged in fp32"
        return {"quantization_config": config.to_dict(), "skip_modules": skip, "adapter_precision": precision,
                "quantized_modules": sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in quantized.modules())}
