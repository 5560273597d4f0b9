"""ExecuTorch target for causal LMs (the encoder path is :mod:`.exporter`, which this target defers
to for every other task): one ``model.pte`` KV-cache decoder (:mod:`.lm_program`), XNNPACK, fp32.

* swappable: every LoRA slot (the adapters' modules, plus those ``--slots`` asks for: attention and
  MLP projections) takes ``P.lora_A [in, R]`` / ``P.lora_B [R, out]`` as method inputs, R the
  profile's ``rank_bound`` (scale and rank gates folded into B); an adapter is
  ``adapters/<name>.ptd``, its factors at their own rank, padded by the session. Adapters that
  carry other tensors (trained norms, a head) are refused: this program takes factors only.
* merged: the adapter folded into the base, no slots.

The tokenizer is saved beside the program (the session tokenizes as validation does);
``executorch.json`` records the cache length, the vocabulary and the end-of-sequence ids."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import LoradeployError
from ...kinds import Task
from ...manifest import ADAPTER_DIR
from . import BASE_TENSORS, FORMAT, FORMAT_VERSION, PROGRAM_CONFIG, PROGRAM_FILE
from .exporter import ExecuTorchTarget, base_fingerprint, method_inputs, rank_problems

if TYPE_CHECKING:
    from ...job import ExportJob

#: positions of the static KV cache: a prompt plus its generated tokens fit in it (the LM latency
#: protocol's longest prompt is 128 tokens; greedy validation 16 + 32)
MAX_CACHE = 256
_PROJECTION = re.compile(r"(.*\.)?layers\.\d+\.(self_attn|mlp)\.\w+_proj")


def _slot_shapes(job: ExportJob) -> dict[str, tuple[int, int]]:
    from ...base_slots import choose

    shapes = choose(job.base_model, [e.pruned for e in job.adapters], job.slots)
    outside = [m for m in shapes if not _PROJECTION.fullmatch(m)]
    if outside:
        raise LoradeployError(f"module {outside[0]} is not an attention or MLP projection: the ExecuTorch decoder takes "
                              "LoRA slots on those only")
    return shapes


def _eos(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]


def export_lm(job: ExportJob, out: Path, progress=None) -> dict:
    """Write the causal-LM artifact into ``out``; the export's decisions."""
    import torch

    from ...base import load_tokenizer
    from ...merge import merge_into
    from ...progress import begin
    from ...traced_graph import adapter_inputs
    from .lm_program import KvCacheDecoder, lower_decoder
    from .tensor_data import write_tensor_data

    step = progress or (lambda _m: None)
    if job.profile.precision != "fp32":
        raise LoradeployError(f"profile {job.profile.name}: causal LMs are exported to ExecuTorch in fp32 only "
                              f"(not {job.profile.precision})")
    if any(e.quantized is not None for e in job.adapters):
        raise LoradeployError(f"target {job.profile.name} keeps adapters in fp32: drop --plan")
    arch = type(job.base_model).__name__
    fingerprint = base_fingerprint(job.base_dir)
    bound = job.profile.options["rank_bound"]
    model = copy.deepcopy(job.base_model).eval()
    if job.mode == "merged":
        (entry,) = job.adapters
        model, shapes, inputs, tensors = merge_into(model, entry.pruned), {}, [], {}
    else:
        problems = rank_problems(job, bound)
        if problems:
            raise LoradeployError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        shapes = _slot_shapes(job)
        # the decoder's factors are static, padded to the bound (no dynamic rank axis)
        inputs = [{k: v for k, v in i.items() if k != "rank_axis"}
                  for i in method_inputs(shapes, dict.fromkeys(shapes, bound), {})]
        names = {i["name"] for i in inputs}  # an adapter tensor with no input (a trained norm) refused before lowering
        tensors = {e.name: adapter_inputs(e.pruned, _qualified(job, e), job.base_model, names, e.source, "program")
                   for e in job.adapters}
    begin(step, f"exporting the {arch} KV-cache decoder ({MAX_CACHE} positions) and lowering it to XNNPACK")
    try:
        model.set_attn_implementation("sdpa")
        module = KvCacheDecoder(model, list(shapes), MAX_CACHE)
    except Exception as e:  # noqa: BLE001  transformers refuses what it cannot run with a static cache
        raise LoradeployError(f"ExecuTorch cannot export a {arch} KV-cache decoder: it needs SDPA attention and "
                              f"transformers' static KV cache, which {arch} has not "
                              f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from e
    factors = [torch.zeros(i["shape"]) for i in inputs]
    summary = lower_decoder(module, factors, MAX_CACHE, arch, out / PROGRAM_FILE)
    step("lowered the decoder")
    load_tokenizer(job.base_dir).save_pretrained(str(out))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": job.task.value, "output": "logits",
              "program": PROGRAM_FILE, "max_batch": 1, "max_seq": MAX_CACHE, "base_fingerprint": fingerprint,
              "mode": job.mode, "rank_bound": bound if inputs else None, "inputs": inputs,
              "base_tensors": BASE_TENSORS if inputs else None, "architecture": arch,
              "vocab_size": int(model.config.get_text_config().vocab_size), "eos_token_ids": _eos(model)}
    decisions = {"partition": summary, "architecture": arch, "kv_cache": f"static, {MAX_CACHE} positions, mutable "
                 "buffers of the program", "base_precision": "fp32", "lora_precision": "float32",
                 "backend": "xnnpack", "base_fingerprint": fingerprint,
                 "rms_norms_as_linear_means": module.norms, "tanh_gelus_written_out": module.gelus}
    if inputs:
        meta = {"base_fingerprint": fingerprint, "rank_bound": bound}
        write_tensor_data({}, out / BASE_TENSORS, {**meta, "adapter": ""})
        (out / ADAPTER_DIR).mkdir()
        sizes = {name: write_tensor_data(t, out / ADAPTER_DIR / f"{name}.ptd", {**meta, "adapter": name})
                 for name, t in tensors.items()}
        decisions.update({"lora_slots_spec": job.slots, "lora_slots": len(shapes), "rank_bound": bound,
                          "rank_dimension": f"padded to {bound} per module", "adapter_file_bytes": sizes})
    (out / PROGRAM_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return decisions


def _qualified(job: ExportJob, entry) -> dict[str, str]:
    from ...merge import find_module

    return {name: find_module(job.base_model, name)[0] for name in entry.pruned.modules}


class ExecuTorchLmTarget(ExecuTorchTarget):
    """The ExecuTorch target: causal LMs here, every other task through :class:`ExecuTorchTarget`."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        if job.task is Task.CAUSAL_LM:
            return export_lm(job, out, progress)
        return super().export(job, out, progress)
