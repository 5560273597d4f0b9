"""llama.cpp target: LoRA adapter GGUFs for a GGUF base (swappable), or a merged GGUF.

Adapter GGUF (written with the ``gguf`` package, names from its tensor-name map):
``general.type = adapter``, ``adapter.type = lora``, tensors ``<base tensor>.lora_a [r, in]``
and ``.lora_b [out, r]``. llama.cpp scales each pair by ``alpha / rank`` with the rank read from
``lora_b`` — after pruning ranks differ per module, so the exact scale (and the rank gates)
are folded into ``lora_b`` and ``adapter.lora.alpha`` is written as 0, which llama.cpp reads as
"scale 1". Conversions that permute q/k rows for rotary embeddings (llama family) get the same
permutation on ``lora_b``.

Merged GGUF: only the adapted tensors are dequantized, ΔW added, and requantized to their type
when the ``gguf`` package can write it, else to :data:`NEAREST_WRITABLE`; every other tensor
and all metadata are copied unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import BaseModelError, LoradeployError
from ...fsutil import link_or_copy
from ...manifest import ADAPTER_DIR
from ...targets.common import Target
from .session import MODEL_FILE

if TYPE_CHECKING:
    from ...ir import AdapterSet
    from ...job import ExportJob

log = logging.getLogger(__name__)

#: architectures whose HF → GGUF conversion permutes q/k rows (convert_hf_to_gguf LlamaModel)
PERMUTED_QK_ARCHS = {"llama"}
#: K-quant (which the gguf package cannot write) → the nearest writable type of no lower quality
NEAREST_WRITABLE = {"Q2_K": "Q4_0", "Q3_K": "Q4_1", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
#: adapter tensor types by profile precision: llama.cpp's LoRA loader takes any ggml type and
#: checks only shapes; these are the ones the gguf package can write. Block types need rows
#: that are whole blocks (32): lora_a rows are `in` long, lora_b rows only `r` (else F16).
ADAPTER_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
                 "q4_1": "Q4_1", "q4_0": "Q4_0"}


def _gguf():
    import gguf

    return gguf


def base_info(path: Path) -> dict:
    """Architecture, block count and head counts of a GGUF base."""
    from .header import read_header

    field = read_header(path).metadata.get  # not gguf.GGUFReader: it decodes the whole vocabulary
    arch = field("general.architecture")
    return {"arch": arch, "blocks": field(f"{arch}.block_count"), "heads": field(f"{arch}.attention.head_count"),
            "heads_kv": field(f"{arch}.attention.head_count_kv") or field(f"{arch}.attention.head_count")}


def tensor_name(info: dict, module: str) -> str:
    """GGUF name (without ``.weight``) of an HF linear module, from the gguf package's map."""
    gguf = _gguf()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == info["arch"]), None)
    if arch is None:
        raise LoradeployError(f"GGUF architecture {info['arch']!r} is unknown to the gguf package")
    name = gguf.get_tensor_name_map(arch, info["blocks"]).get_name(module + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise LoradeployError(f"module {module} has no GGUF tensor name for {info['arch']}")
    return name.removesuffix(".weight")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (interleaved → half-split rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permutation_heads(info: dict, gguf_name: str) -> int | None:
    if info["arch"] not in PERMUTED_QK_ARCHS:
        return None
    if gguf_name.endswith("attn_q"):
        return info["heads"]
    if gguf_name.endswith("attn_k"):
        return info["heads_kv"]
    return None


def adapter_tensors(adapters: AdapterSet, info: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF name → (lora_a [r,in], lora_b [out,r]) with scale and gates folded into lora_b."""
    import torch

    out = {}
    for name, m in adapters.modules.items():
        g = tensor_name(info, name)
        a = m.lora_A.to(torch.float32).numpy()
        b = m.folded_b().to(torch.float32).numpy()
        heads = _permutation_heads(info, g)
        out[g] = (np.ascontiguousarray(a), np.ascontiguousarray(permute_rows(b, heads) if heads else b))
    return out


def _typed(arr: np.ndarray, type_name: str):
    """``arr`` converted to GGML type ``type_name`` (F16 when its rows are not whole blocks);
    uint8 ``arr``: that type's block bytes already (codes chosen by output-aware rounding)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    if arr.dtype == np.uint8:
        return arr, qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(arr, qtype), qtype


def planned_tensors(quantized, info: dict) -> dict[str, tuple[tuple[np.ndarray, str], tuple[np.ndarray, str]]]:
    """GGUF name → ((lora_a, type), (lora_b, type)) from a quantization plan's stored forms:
    float formats as values, GGML block types as their block bytes where the plan chose the codes
    (output-aware rounding), else as the clipped values the plan chose (the gguf package's
    quantizer then reproduces the plan's blocks exactly)."""
    out = {}
    for name, m in quantized.simulated.modules.items():
        g = tensor_name(info, name)
        pair = []
        for role in ("lora_A", "lora_B"):
            q = quantized.stored[f"{name}.{role}"]
            arr = next((q.payload[k] for k in ("blocks", "clipped") if k in q.payload), None)
            arr = q.payload["values"].astype(np.float32) if arr is None else arr
            heads = _permutation_heads(info, g) if role == "lora_B" else None
            pair.append((np.ascontiguousarray(permute_rows(arr, heads) if heads else arr), q.format.upper()))
        out[g] = tuple(pair)
    return out


def write_adapter(path: Path, adapters: AdapterSet, info: dict, precision: str, quantized=None) -> dict[str, str]:
    """Write one adapter GGUF; returns the GGML type chosen per tensor. With ``quantized`` (a
    plan applied) each tensor takes its planned type, else every tensor ``precision``."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), info["arch"])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp applies scale 1, see module doc
    if quantized is not None:
        tensors = planned_tensors(quantized, info)
    else:
        kind = ADAPTER_TYPES[precision]
        tensors = {g: ((a, kind), (b, kind)) for g, (a, b) in adapter_tensors(adapters, info).items()}
    types = {}
    for name, pair in sorted(tensors.items()):
        for suffix, (arr, type_name) in zip(("lora_a", "lora_b"), pair):
            data, qtype = _typed(arr, type_name)
            writer.add_tensor(f"{name}.weight.{suffix}", data, raw_dtype=qtype)
            types[f"{name}.weight.{suffix}"] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def copy_fields(reader, writer, array_limit: int | None = None) -> None:
    """Every metadata field of ``reader`` (but the architecture, the writer's own) into ``writer``;
    ``array_limit``: array fields cut to their first entries (small test files of a big vocabulary)."""
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if sub is not None and array_limit is not None:
            value = value[:array_limit]
        writer.add_key_value(name, value, vtype, sub_type=sub)


def travelling_tensors(reader, adapters: AdapterSet, info: dict, base_model) -> dict[str, np.ndarray]:
    """GGUF name → new value for every non-LoRA tensor the adapter carries (norm weights, biases).

    The GGUF may store a tensor transformed from its Hugging Face value (Gemma's converter writes
    norm weights + 1), so the value written is the adapter's plus the GGUF's offset from the base's
    own (PyTorch) value. That holds only for float tensors whose offset is one constant; anything
    else (a quantized or permuted tensor) is refused."""
    import torch

    if not adapters.extra_tensors:
        return {}
    gguf = _gguf()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == info["arch"])
    names = gguf.get_tensor_name_map(arch, info["blocks"])
    stored = {t.name: t for t in reader.tensors}
    params = dict(base_model.named_parameters())
    prefix = getattr(base_model, "base_model_prefix", "") or ""
    out = {}
    for key, value in adapters.extra_tensors.items():
        hf = key if key in params else f"{prefix}.{key}"
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        t = stored.get(g)
        if hf not in params or t is None:
            raise BaseModelError(f"tensor {key} of the adapter has no tensor in the GGUF base")
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
            raise BaseModelError(f"tensor {key} is stored as {t.tensor_type.name} in the GGUF base: merging a "
                                 "replacement for a quantized tensor is not supported")
        base_gguf = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(value.shape)
        offset = base_gguf - params[hf].detach().to(torch.float64).numpy()
        if np.ptp(offset) > 1e-3 * max(1.0, float(np.abs(base_gguf).max())):
            raise BaseModelError(f"tensor {key} is stored transformed in the GGUF base (not a constant offset "
                                 "from its Hugging Face value): it cannot be merged")
        out[g] = (value.to(torch.float64).numpy() + float(np.median(offset))).astype(np.float32)
    return out


def write_merged(src: Path, dst: Path, adapters: AdapterSet, info: dict, base_model=None) -> dict[str, str]:
    """Copy the GGUF ``src`` to ``dst`` with ΔW added to the adapted tensors (requantized) and the
    tensors the adapter carries (norms) written in place of the base's."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(src))
    deltas = {}
    for name, m in adapters.modules.items():
        g = tensor_name(info, name)
        d = m.delta_weight().float().numpy()
        heads = _permutation_heads(info, g)
        deltas[g + ".weight"] = permute_rows(d, heads) if heads else d
    replaced = travelling_tensors(reader, adapters, info, base_model)
    writer = gguf.GGUFWriter(str(dst), info["arch"])
    copy_fields(reader, writer)
    types = {}
    for t in reader.tensors:
        if t.name in replaced:
            data, qtype = _typed(replaced[t.name].reshape(t.data.shape), t.tensor_type.name)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
            types[t.name] = f"{t.tensor_type.name} (the adapter's)"
            continue
        if t.name not in deltas:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(deltas[t.name].shape) + deltas[t.name]
        name = NEAREST_WRITABLE.get(t.tensor_type.name, t.tensor_type.name)
        data, qtype = _typed(w.astype(np.float32), name)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        types[t.name] = f"{t.tensor_type.name} -> {qtype.name}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


class GgufTarget(Target):
    """Writes adapter GGUFs beside the base, or a merged GGUF (loaded by :mod:`loradeploy.plugins.llama_cpp.session`)."""

    def export(self, job: ExportJob, out: Path, progress=None) -> dict:
        base = Path(job.base_dir)
        if not base.is_file():
            raise LoradeployError(f"{base}: the llama.cpp target needs a GGUF base file; convert a Hugging Face "
                                  "folder with llama.cpp's convert_hf_to_gguf.py (`python convert_hf_to_gguf.py "
                                  "FOLDER --outtype f16`), or use the gemma3-270m alias")
        info = base_info(base)
        if job.mode == "merged":
            (entry,) = job.adapters
            types = write_merged(base, out / MODEL_FILE, entry.pruned, info, job.base_model)
            return {"base_architecture": info["arch"], "merged_tensor_types": types}
        for entry in job.adapters:
            if entry.pruned.extra_tensors:
                first = next(iter(entry.pruned.extra_tensors))
                raise LoradeployError(
                    f"{entry.source}: carries {len(entry.pruned.extra_tensors)} tensors besides LoRA ({first} …); "
                    "a llama.cpp LoRA adapter GGUF holds only lora_a/lora_b pairs, so it cannot be swappable: "
                    "use --mode merged (or auto), which writes them into the merged GGUF")
        link_or_copy(base, out / MODEL_FILE)  # same file system: no copy of the base
        (out / ADAPTER_DIR).mkdir()
        types = {}
        for entry in job.adapters:
            types[entry.name] = write_adapter(out / ADAPTER_DIR / f"{entry.name}.gguf", entry.pruned, info,
                                              job.profile.precision, entry.quantized)
        return {"base_architecture": info["arch"], "adapter_alpha": 0.0, "adapter_tensor_types": types,
                "qk_permuted": info["arch"] in PERMUTED_QK_ARCHS}
