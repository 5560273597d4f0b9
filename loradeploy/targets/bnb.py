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

import numpy as np

from ..errors import LoradeployError
from .common import Runner, Target

if TYPE_CHECKING:
    from .common import ExportJob

ADAPTER_DIR = "adapters"
FP32_TMP = ".fp32-staging"


def quantization_config(precision: str, double_quant: bool, skip: list[str]):
    import torch
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip or None)


def _auto_class(task):
    import transformers

    from ..ir import Task

    return {Task.SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            Task.FEATURE_EXTRACTION: transformers.AutoModel,
            Task.CAUSAL_LM: transformers.AutoModelForCausalLM}[task]


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


def reference_unit(threads: int = 0):
    """A fixed fp32 MLP block (384 → 1536 → 384 on 128 positions, seeded weights) in PyTorch,
    the runtime bitsandbytes computes in, at the runner's thread count."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(shape, generator=g) * 0.05 for shape in ((128, 384), (384, 1536), (1536, 384)))

    def unit() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.relu(x @ w1) @ w2
        return (time.perf_counter() - t0) * 1e3
    return unit


class BnbTarget(Target):
    runtime = "bitsandbytes"
    distribution = "bitsandbytes"
    adapter_suffix = ""  # each adapter is a PEFT folder adapters/NAME

    def export(self, job: ExportJob, out: Path) -> dict:
        from ..adapters import peft as peft_format
        from ..base import load_tokenizer
        from ..merge import load_extras, merge_into

        staging = out / FP32_TMP
        model = copy.deepcopy(job.base_model)
        if job.mode == "merged":
            (entry,) = job.adapters
            merge_into(model, entry.pruned)
        else:
            load_extras(model, job.adapters[0].pruned)  # a head in the base; each adapter carries its own
        model.save_pretrained(staging)
        del model
        skip = _head_modules(job)
        config = quantization_config(job.profile.precision, job.profile.double_quant, skip)
        quantized = _auto_class(job.task).from_pretrained(str(staging), quantization_config=config)
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

    def reference_unit(self, threads: int = 0):
        return reference_unit(threads)

    def open(self, artifact: Path, manifest: dict, threads: int = 0) -> "BnbRunner":
        from ..ir import Task

        names = [a["name"] for a in manifest.get("adapters", []) if a.get("file") is not None]
        return BnbRunner(artifact, Task(manifest["task"]), names, threads)


class BnbRunner(Runner):
    """transformers (+ PEFT) holding the quantized base once; adapters switched per call."""

    def __init__(self, artifact: Path, task, adapters: list[str], threads: int = 0):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self.task = task
        self.model = _auto_class(task).from_pretrained(str(artifact)).eval()
        self.adapters = tuple(adapters)
        if adapters:
            from peft import PeftModel

            first, *rest = adapters
            self.model = PeftModel.from_pretrained(self.model, str(artifact / ADAPTER_DIR / first), adapter_name=first)
            for name in rest:
                self.model.load_adapter(str(artifact / ADAPTER_DIR / name), adapter_name=name)
            self.model.eval()
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(artifact))

    def _forward(self, adapter, **inputs):
        import contextlib

        import torch

        if adapter is not None and adapter not in self.adapters:
            raise LoradeployError(f"adapter {adapter!r} is not in this artifact (has: {', '.join(self.adapters) or 'none'})")
        if self.adapters and adapter is not None:
            self.model.set_adapter(adapter)
        ctx = self.model.disable_adapter() if self.adapters and adapter is None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return self.model(**inputs)

    def run(self, input_ids, attention_mask, adapter=None):
        import torch

        from ..ir import Task

        ids, mask = torch.from_numpy(np.asarray(input_ids)), torch.from_numpy(np.asarray(attention_mask))
        out = self._forward(adapter, input_ids=ids, attention_mask=mask)
        if self.task is Task.SEQUENCE_CLASSIFICATION:
            return out.logits.float().numpy()
        if self.task is Task.CAUSAL_LM:
            return out.logits[:, -1].float().numpy()
        m = mask.unsqueeze(-1).float()
        return ((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().numpy()

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer(text)["input_ids"]

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        import torch

        return self._forward(adapter, input_ids=torch.tensor([tokens])).logits[0].float().numpy()
