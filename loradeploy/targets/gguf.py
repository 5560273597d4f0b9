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

import ctypes
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LoradeployError
from .common import Runner, Target

if TYPE_CHECKING:
    from ..ir import AdapterSet
    from .common import ExportJob

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
ADAPTER_DIR = "adapters"
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
    reader = _gguf().GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
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
        b = (m.lora_B.to(torch.float64) * m.rank_gain() * m.scale).to(torch.float32).numpy()
        heads = _permutation_heads(info, g)
        out[g] = (np.ascontiguousarray(a), np.ascontiguousarray(permute_rows(b, heads) if heads else b))
    return out


def _typed(arr: np.ndarray, type_name: str):
    """``arr`` converted to GGML type ``type_name`` (F16 when its rows are not whole blocks)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(arr, qtype), qtype


def planned_tensors(quantized, info: dict) -> dict[str, tuple[tuple[np.ndarray, str], tuple[np.ndarray, str]]]:
    """GGUF name → ((lora_a, type), (lora_b, type)) from a quantization plan's stored forms:
    float formats as values, GGML block types as the clipped values the plan chose (the gguf
    package's quantizer then reproduces the plan's blocks exactly)."""
    out = {}
    for name, m in quantized.simulated.modules.items():
        g = tensor_name(info, name)
        pair = []
        for role in ("lora_A", "lora_B"):
            q = quantized.stored[f"{name}.{role}"]
            arr = q.payload["clipped"] if "clipped" in q.payload else q.payload["values"].astype(np.float32)
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


def _copy_fields(reader, writer) -> None:
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def write_merged(src: Path, dst: Path, adapters: AdapterSet, info: dict) -> dict[str, str]:
    """Copy the GGUF ``src`` to ``dst`` with ΔW added to the adapted tensors (requantized)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(src))
    deltas = {}
    for name, m in adapters.modules.items():
        g = tensor_name(info, name)
        d = m.delta_weight().float().numpy()
        heads = _permutation_heads(info, g)
        deltas[g + ".weight"] = permute_rows(d, heads) if heads else d
    writer = gguf.GGUFWriter(str(dst), info["arch"])
    _copy_fields(reader, writer)
    types = {}
    for t in reader.tensors:
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


#: the reference unit's model: a fixed tiny llama (seeded weights, Q8_0 matrices), bump the
#: version when its recipe changes (its file name carries it)
REFERENCE_MODEL = {"version": 1, "hidden": 256, "heads": 4, "layers": 2, "ffn": 768, "vocab": 512, "tokens": 64}


def _write_reference_model(path: Path) -> None:
    gguf = _gguf()
    r = REFERENCE_MODEL
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4 * r["tokens"])
    w.add_embedding_length(r["hidden"])
    w.add_block_count(r["layers"])
    w.add_feed_forward_length(r["ffn"])
    w.add_head_count(r["heads"])
    w.add_head_count_kv(r["heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(r["hidden"] // r["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(r["vocab"] - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (r["vocab"] - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    h, f, v = r["hidden"], r["ffn"], r["vocab"]

    def matrix(name: str, rows: int, cols: int) -> None:
        arr = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", v, h)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    matrix("output.weight", v, h)
    for i in range(r["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{name}.weight", h, h)
        matrix(f"blk.{i}.ffn_gate.weight", f, h)
        matrix(f"blk.{i}.ffn_up.weight", f, h)
        matrix(f"blk.{i}.ffn_down.weight", h, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_model() -> Path:
    """The reference unit's GGUF in the cache folder (written once, then reused)."""
    from ..fsutil import cache_dir

    path = cache_dir() / f"reference-unit-v{REFERENCE_MODEL['version']}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        _write_reference_model(tmp)
        os.replace(tmp, path)
    return path


def reference_unit(threads: int = 0):
    """Prompt processing of 64 tokens on :func:`reference_model` in llama.cpp, at the runner's
    thread count: the same ggml kernels (Q8_0 dot products) the artifact's model runs."""
    import time

    import llama_cpp

    route_llama_log(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(reference_model()), n_ctx=4 * REFERENCE_MODEL["tokens"],
                          n_batch=REFERENCE_MODEL["tokens"], verbose=False, n_threads=threads or os.cpu_count())
    tokens = [1] + [300 + i for i in range(REFERENCE_MODEL["tokens"] - 1)]

    def unit() -> float:
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(tokens)
        return (time.perf_counter() - t0) * 1e3
    unit.model = llm  # kept alive with the unit
    return unit


class GgufTarget(Target):
    runtime = "llama.cpp"
    distribution = "llama-cpp-python"
    adapter_suffix = ".gguf"

    def export(self, job: ExportJob, out: Path) -> dict:
        base = Path(job.base_dir)
        if not base.is_file():
            raise LoradeployError(f"{base}: the llama.cpp target needs a GGUF base file")
        info = base_info(base)
        if job.mode == "merged":
            (entry,) = job.adapters
            types = write_merged(base, out / MODEL_FILE, entry.pruned, info)
            return {"base_architecture": info["arch"], "merged_tensor_types": types}
        try:
            os.link(base, out / MODEL_FILE)  # same file system: no copy of the base
        except OSError:
            shutil.copyfile(base, out / MODEL_FILE)
        (out / ADAPTER_DIR).mkdir()
        types = {}
        for entry in job.adapters:
            types[entry.name] = write_adapter(out / ADAPTER_DIR / f"{entry.name}.gguf", entry.pruned, info,
                                              job.profile.precision, entry.quantized)
        return {"base_architecture": info["arch"], "adapter_alpha": 0.0, "adapter_tensor_types": types,
                "qk_permuted": info["arch"] in PERMUTED_QK_ARCHS}

    def reference_unit(self, threads: int = 0):
        return reference_unit(threads)

    def open(self, artifact: Path, manifest: dict, threads: int = 0) -> "LlamaRunner":
        names = [a["name"] for a in manifest.get("adapters", []) if a.get("file")]
        return LlamaRunner(artifact / MODEL_FILE, {n: artifact / ADAPTER_DIR / f"{n}.gguf" for n in names}, threads)

    def open_base(self, base: Path, threads: int = 0) -> "LlamaRunner":
        return LlamaRunner(Path(base), {}, threads)


_LOG_CALLBACK = None  # kept alive for as long as llama.cpp may call it


def route_llama_log(llama_cpp) -> None:
    """Route llama.cpp's log (a warning per quantized adapter tensor it places) to the
    ``llama.cpp`` logger at DEBUG: llama-cpp-python's own filter maps ggml's current level
    numbers wrongly and prints them."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        llama_log = logging.getLogger("llama.cpp")
        _LOG_CALLBACK = llama_cpp.llama_log_callback(
            lambda level, text, _: llama_log.debug(text.decode("utf-8", "replace").rstrip()))
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaRunner(Runner):
    """llama.cpp through llama-cpp-python: the model once, adapters switched per call with
    ``llama_set_adapters_lora`` (a context is not shared across threads: one runner each)."""

    def __init__(self, model: Path, adapters: dict[str, Path], threads: int = 0, n_ctx: int = 256):
        import llama_cpp

        route_llama_log(llama_cpp)
        self._ll = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx,
                                   logits_all=True, verbose=False, n_threads=threads or os.cpu_count())
        self.adapters = tuple(adapters)
        self._paths = dict(adapters)
        self._lora = {name: self.load_adapter(path) for name, path in self._paths.items()}
        self._active: object = "unset"

    def load_adapter(self, path: Path):
        ptr = self._ll.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
        if not ptr:
            raise LoradeployError(f"{path}: llama.cpp refused the adapter")
        return ptr

    def activate(self, adapter: str | None) -> None:
        if adapter == self._active:
            return
        if adapter is None:
            self._ll.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            if adapter not in self._lora:
                raise LoradeployError(f"adapter {adapter!r} is not in this artifact (has: {', '.join(self.adapters) or 'none'})")
            arr = (self._ll.llama_adapter_lora_p_ctypes * 1)(self._lora[adapter])
            self._ll.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        self._active = adapter
        self.llm.reset()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True)

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of every position."""
        self.activate(adapter)
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def run(self, input_ids, attention_mask, adapter=None):
        return np.stack([self.logits([int(t) for t, m in zip(row, mask) if m], adapter)[-1]
                         for row, mask in zip(input_ids, attention_mask)])

    # -- throughput, measured by the latency worker in a fresh process ----------------------
    def _time(self, fn, warmup: int, runs: int) -> list[float]:
        import time

        for _ in range(warmup):
            fn()
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def _prompt(self, adapter, tokens: list[int]):
        def run():
            self.activate(adapter)
            self.llm.reset()
            self.llm.eval(tokens)
        return run

    def _generate(self, adapter, prompt: list[int], n: int):
        def run():
            self.activate(adapter)
            self.llm.reset()
            self.llm.eval(prompt)
            for i in range(n):
                self.llm.eval([1000 + i])
        return run

    def measure(self, adapter: str | None, shapes: list[tuple[int, int]], warmup: int, runs: int,
                reference=None) -> dict:
        """Prompt processing per shape (one sequence of ``seq`` tokens) and generation speed, with
        ``adapter`` and with the base alone (interleaved, and with ``reference``, the runtime's
        fixed unit), adapter load/switch vs model reload."""
        import statistics
        import time

        import llama_cpp

        from ..latency import ScaledReference, ratio_stats

        result, llama = {}, {}
        for _, seq in shapes:
            tokens = [2] + [1000 + i for i in range(seq - 1)]
            warm = self._time(self._prompt(adapter, tokens), warmup, 1)
            ref = ScaledReference(reference, min(warm)) if reference is not None else None
            with_adapter, base, refs = [], [], []
            for _ in range(max(runs, 1)):
                if ref is not None:
                    refs.append(ref())
                with_adapter += self._time(self._prompt(adapter, tokens), 0, 1)
                base += self._time(self._prompt(None, tokens), 0, 1)
            result[f"pp{seq}"] = _stats(with_adapter)
            if ref is not None:
                result[f"pp{seq}"].update(ratio_stats(with_adapter, refs, ref.repeats))
            llama[f"pp{seq}_tokens_per_s"] = seq / (statistics.median(with_adapter) / 1e3)
            llama[f"pp{seq}_tokens_per_s_base"] = seq / (statistics.median(base) / 1e3)
        n_gen = 32
        gen_a, gen_b, gen_refs = [], [], []
        ref = None
        for _ in range(max(runs // 4, 2)):
            gen_a += self._time(self._generate(adapter, [2, 1000, 1001, 1002], n_gen), 0, 1)
            if reference is not None:
                ref = ref or ScaledReference(reference, gen_a[0])  # as long as a whole generation
                gen_refs.append(ref())
            gen_b += self._time(self._generate(None, [2, 1000, 1001, 1002], n_gen), 0, 1)
        result["tg"] = _stats([g / n_gen for g in gen_a])
        if ref is not None:
            result["tg"].update(ratio_stats([g / n_gen for g in gen_a], gen_refs, ref.repeats))
        llama["tg_tokens_per_s"] = n_gen / (statistics.median(gen_a) / 1e3)
        llama["tg_tokens_per_s_base"] = n_gen / (statistics.median(gen_b) / 1e3)
        if adapter is not None:
            path = next(iter(self._paths.values()))
            t0 = time.perf_counter()
            extra = self.load_adapter(path)
            llama["adapter_load_ms"] = (time.perf_counter() - t0) * 1e3
            llama_cpp.llama_adapter_lora_free(extra)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora[adapter])
            scale = (ctypes.c_float * 1)(1.0)
            t0 = time.perf_counter()
            for _ in range(100):
                llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, scale)
                llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
            llama["adapter_switch_ms"] = (time.perf_counter() - t0) * 1e3 / 200
            self._active = None
            t0 = time.perf_counter()
            reloaded = llama_cpp.Llama(model_path=self.llm.model_path, n_ctx=self.llm.n_ctx(), verbose=False)
            llama["model_reload_ms"] = (time.perf_counter() - t0) * 1e3
            reloaded.close()
            llama["reload_over_switch"] = llama["model_reload_ms"] / llama["adapter_switch_ms"]
        return {"shapes": result, "llama": llama}


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "samples_ms": [float(x) for x in samples]}
