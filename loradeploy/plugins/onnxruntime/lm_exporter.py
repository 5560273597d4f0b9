"""ONNX target for causal LMs: a KV-cache decoder built by onnxruntime-genai's model builder, with
LoRA slots added as graph inputs (runtime side: ``loradeploy.plugins.onnxruntime.session``).

Why the builder and not our own trace: the builder emits the decoder onnxruntime-genai runs —
GroupQueryAttention with the KV cache as inputs/outputs, packed Q/K/V MatMul, rotary caches,
Gemma 3's sliding-window layers, int4 ``MatMulNBits`` base weights, ``genai_config.json`` and the
tokenizer files. What it does not do well for deployment is LoRA: given a PEFT folder
(``adapter_path``) it bakes *one* adapter's A/B into the graph as initializers, at the PEFT
config's single rank, and turns packed Q/K/V off for the whole graph. So the builder builds the
**base** (packed Q/K/V kept), and :func:`add_lora_slots` then adds, behind every projection
MatMul of every layer, ``+ (x @ M.lora_A) @ M.lora_B`` with ``M.lora_A [in, r]`` and
``M.lora_B [r, out]`` graph inputs (``M`` the Hugging Face module name, e.g.
``model.layers.3.self_attn.q_proj``) whose rank axis is dynamic and per module, defaulting to
empty rank-0 tensors. Behind a packed Q/K/V MatMul the three deltas are concatenated in the
packed order, so each module keeps its own pruned rank. Scale and rank gates are folded into
``lora_B``; each adapter is one ``.onnx_adapter`` file, as for encoders. The RMSNorm weights are
overridable inputs too (``norms`` in the slots, the default: :mod:`.lm_norm_inputs`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import BaseModelError, LoradeployError
from ...slots import natural_key

if TYPE_CHECKING:
    from ...job import ExportJob

#: Hugging Face architectures this path exports (the builder supports more; these are tested).
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")
#: profile precision → the builder's precision ("gguf": an fp32 build whose projections then take
#: the GGUF base's own blocks, see ``onnx_gguf.py``)
PRECISIONS = {"fp32": "fp32", "int4": "int4", "gguf": "fp32"}
#: builder options: a full-length KV cache on every layer (the windowed sliding-window cache
#: needs a cache of at least the window, 512 tokens for Gemma 3, even for short prompts)
BUILDER_OPTIONS = ("windowed_kv_cache=false",)
#: builder options per precision. int4: the k-quant search (asymmetric blocks of 32 with a zero point
#: each, scale and minimum searched per block as llama.cpp's Q4_K does) instead of symmetric round to
#: nearest: on Gemma 3 270M's Q4_K_M base the base alone's mean KL from its dequantized weights falls
#: from 0.37 to 0.29 at the same speed (benchmarks/onnx_lm.py)
PRECISION_OPTIONS = {"int4": ("algo_config=k_quant",)}


def builder_options(precision: str) -> list[str]:
    """The builder options loradeploy passes for a profile precision (recorded in the manifest)."""
    return [*BUILDER_OPTIONS, *PRECISION_OPTIONS.get(precision, ())]

_SITE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)_proj/MatMul(?:_Q\d)?$")
_PACKED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
_BLOCK = {"attn": "self_attn", "mlp": "mlp"}


def check_architecture(model) -> str:
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise BaseModelError(f"a {arch} base cannot be exported to ONNX as a decoder (supported: "
                             f"{', '.join(ARCHITECTURES)})")
    return arch


def builder_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


def _legacy_rope(config) -> None:
    """transformers ≥ 5 keeps Gemma 3's two RoPE bases as ``rope_parameters`` per layer type; the
    builder (0.18) reads the global one flat and the local one as ``rope_local_base_freq``."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        full = dict(rp["full_attention"])
        config.rope_local_base_freq = rp.get("sliding_attention", full)["rope_theta"]
        config.rope_parameters, config.rope_theta = full, full["rope_theta"]


#: blocks per call of onnxruntime's k-quant search: its numpy temporaries then stay in the CPU's
#: caches (16,384 blocks of 32: 2 MB per float32 array) instead of ~20 passes over 670 MB arrays
#: for Gemma 3's tied 262,144 × 640 head
K_QUANT_CHUNK = 16384


@contextlib.contextmanager
def chunked_k_quant():
    """Run onnxruntime's k-quant search (``quant_tensor_k_quant_cpu``, every computation in it per
    block of ``group_size``) on chunks of blocks, on the machine's cores: the same arrays bit for bit
    (test), ~2.5× faster on 2 cores. Patched for the duration of a build only."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.quant_tensor_k_quant_cpu

    def chunked(data, num_bits=4, group_size=32):
        blocks = np.reshape(data, (-1, group_size))
        starts = range(0, blocks.shape[0], K_QUANT_CHUNK)
        if len(starts) <= 1:
            return original(data, num_bits, group_size)
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # numpy releases the GIL
            parts = list(pool.map(lambda i: original(blocks[i:i + K_QUANT_CHUNK], num_bits, group_size), starts))
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))

    weight_only.quant_tensor_k_quant_cpu = chunked
    try:
        yield
    finally:
        weight_only.quant_tensor_k_quant_cpu = original


def build_decoder(hf_dir: Path, out: Path, precision: str, cache: Path, extra: tuple[str, ...] = ()) -> None:
    """The builder's decoder (``model.onnx`` + ``model.onnx.data``, ``genai_config.json``,
    tokenizer files) for the Hugging Face folder ``hf_dir``, with ``extra`` builder options
    (``KEY=VALUE``) after loradeploy's own; its console output is kept and only its last line
    shown if it fails."""
    from onnxruntime_genai.models import builder

    if precision not in PRECISIONS:
        raise LoradeployError(f"precision {precision!r} has no causal-LM ONNX build (use onnx-cpu or onnx-cpu-int4)")
    log = io.StringIO()
    quiet = logging.root.manager.disable
    try:
        # the k-quant path logs onnx_ir warnings about the tied head's intermediate graph through
        # handlers bound to the real stderr; the finished graph loads and is checked by validation
        logging.disable(logging.WARNING)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), chunked_k_quant():
            options = builder.parse_extra_options(None, str(hf_dir), str(out), PRECISIONS[precision], "cpu",
                                                  str(cache), [*builder_options(precision), *extra])
            _legacy_rope(options["hf_details"]["hf_config"])
            builder.create_model(None, str(hf_dir), str(out), PRECISIONS[precision], "cpu", str(cache), **options)
    except Exception as e:  # the builder raises bare Exception/ValueError/KeyError alike
        last = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise LoradeployError(f"{hf_dir}: onnxruntime-genai's model builder failed ({last})") from e
    finally:
        logging.disable(quiet)


def lora_sites(model) -> dict[str, tuple[str, ...]]:
    """Projection MatMul nodes of the builder's graph → the Hugging Face modules whose outputs
    they compute, in output order (three for a packed Q/K/V MatMul)."""
    sites = {}
    for node in model.graph.node:
        m = _SITE.match(node.name)
        if m and node.op_type in ("MatMul", "MatMulNBits"):
            layer, block, proj = m.groups()
            parts = _PACKED.get(proj, (proj,))
            sites[node.name] = tuple(f"model.layers.{layer}.{_BLOCK[block]}.{p}_proj" for p in parts)
    return sites


def add_lora_slots(model, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Add a LoRA path behind every projection MatMul of the onnx ``model`` (in place) for the
    modules in ``shapes`` (name → (in, out)); returns the modules given a slot. A packed MatMul
    takes slots only when every module it computes has one."""
    from onnx import TensorProto, helper

    graph = model.graph
    sites = lora_sites(model)
    nodes, added = [], []
    for node in graph.node:
        nodes.append(node)
        modules = sites.get(node.name)
        if not modules or not all(m in shapes for m in modules):
            continue
        x, y = node.input[0], node.output[0]
        base = f"{y}/without_lora"
        node.output[0] = base
        deltas = []
        for m in modules:
            in_f, out_f = shapes[m]
            graph.input.append(helper.make_tensor_value_info(f"{m}.lora_A", TensorProto.FLOAT, [in_f, f"rank_{m}"]))
            graph.input.append(helper.make_tensor_value_info(f"{m}.lora_B", TensorProto.FLOAT, [f"rank_{m}", out_f]))
            nodes.append(helper.make_node("MatMul", [x, f"{m}.lora_A"], [f"{m}/lora_A/out"], name=f"{m}/lora_A/MatMul"))
            nodes.append(helper.make_node("MatMul", [f"{m}/lora_A/out", f"{m}.lora_B"], [f"{m}/lora_B/out"],
                                          name=f"{m}/lora_B/MatMul"))
            deltas.append(f"{m}/lora_B/out")
            added.append(m)
        if len(deltas) > 1:
            nodes.append(helper.make_node("Concat", deltas, [f"{y}/lora_delta"], axis=-1, name=f"{y}/lora/Concat"))
            deltas = [f"{y}/lora_delta"]
        nodes.append(helper.make_node("Add", [base, deltas[0]], [y], name=f"{y}/lora/Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    return added


def projection_shapes(base_model, sites: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, int]]:
    """(in, out) of every module a projection MatMul computes, from the PyTorch base."""
    mods = dict(base_model.named_modules())
    shapes = {}
    for modules in sites.values():
        for m in modules:
            lin = mods.get(m)
            if lin is None or not hasattr(lin, "in_features"):
                raise LoradeployError(f"the decoder graph computes {m}, which the PyTorch base does not have as a "
                                      "linear layer")
            shapes[m] = (lin.in_features, lin.out_features)
    return dict(sorted(shapes.items(), key=lambda kv: natural_key(kv[0])))


def check_slots(job: ExportJob, shapes: dict[str, tuple[int, int]]) -> None:
    """Every adapter module must be a slot of the graph, with the slot's shape; every other tensor
    it carries must be an RMSNorm weight of the base (:mod:`.lm_norm_inputs`)."""
    from .lm_norm_inputs import carry_problems

    for e in job.adapters:
        problems = [f"{name} is not a projection of the decoder graph (slots: attention and MLP projections)"
                    for name in e.pruned.modules if name not in shapes]
        problems += [f"{name} is {m.in_features}→{m.out_features}, the base's is {shapes[name][0]}→{shapes[name][1]}"
                     for name, m in e.pruned.modules.items() if name in shapes
                     and (m.in_features, m.out_features) != shapes[name]]
        problems += carry_problems(e.pruned, job.base_model)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BaseModelError(f"{e.source}: {problems[0]}{more}")


def set_defaults(model, defaults: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    present = {i.name for i in model.graph.initializer}
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in defaults.items() if n not in present)


def _transcode_build(build: Path, out: Path, gguf_path: Path) -> dict[str, str]:
    """The fp32 decoder in ``build`` with its projections and head replaced by the GGUF's blocks,
    written to ``out`` with the build's other files."""
    import shutil

    import onnx

    from . import MODEL_FILE
    from .gguf_decoder import transcode_gguf

    model = onnx.load(str(build / MODEL_FILE))
    done = transcode_gguf(model, gguf_path, lora_sites(model))
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{MODEL_FILE}.data", size_threshold=1024)
    for f in build.iterdir():
        if not f.name.startswith(MODEL_FILE):
            shutil.copy(f, out / f.name)
    return done


def _chosen(job: ExportJob, shapes: dict[str, tuple[int, int]], sites: dict[str, tuple[str, ...]]) -> dict:
    """The projections ``job.slots`` asks for (:mod:`loradeploy.slots`); a packed MatMul's
    modules take slots together."""
    from ...base_slots import choose

    wanted = choose(job.base_model, [e.pruned for e in job.adapters], job.slots)
    outside = [m for m in wanted if m not in shapes]
    if outside:
        raise LoradeployError(f"--slots: {outside[0]} is not a projection of the decoder graph (slots: attention "
                              "and MLP projections)")
    keep = set(wanted)
    for modules in sites.values():
        if keep.intersection(modules):
            keep.update(modules)
    return {m: s for m, s in shapes.items() if m in keep}


def _expected_slots(base_model) -> dict[str, tuple[int, int]]:
    """The attention and MLP projections of the PyTorch base (what the graph gives slots to)."""
    import torch

    pattern = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    return {n: (m.in_features, m.out_features) for n, m in base_model.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)}


def export_lm(job: ExportJob, out: Path, progress=None) -> dict:
    """Write a causal-LM artifact into ``out``: the builder's decoder, merged (the adapter folded
    into the weights before the build) or swappable (LoRA slots + one adapter file each)."""
    import copy
    import tempfile

    import onnx

    from ...base import hf_folder, load_tokenizer
    from ...fsutil import cache_dir
    from ...manifest import ADAPTER_DIR
    from ...merge import merge_into
    from . import MODEL_FILE
    from .genai_tokenizer import write_special_tokens
    from .adapter_tensors import lora_inputs, lora_slot_decisions, slot_formats, write_adapter_file
    from ...traced_graph import lora_factors
    from .lora_inputs import default_arrays, lower_inputs
    from .lm_norm_inputs import add_norm_inputs, graph_norms, norm_tensors

    from ...progress import begin

    step = progress or (lambda _m: None)
    arch = check_architecture(job.base_model)
    precision = job.profile.precision
    if precision not in PRECISIONS:
        raise LoradeployError(f"profile {job.profile.name}: precision {precision} has no causal-LM ONNX build "
                              "(use onnx-cpu or onnx-cpu-int4)")
    if job.mode == "swappable":
        check_slots(job, _expected_slots(job.base_model))
    from_gguf = precision == "gguf"
    if from_gguf and not Path(job.base_dir).is_file():
        raise BaseModelError(f"profile {job.profile.name} keeps a GGUF base's own blocks; {job.base_spec} is not a GGUF "
                             "file (use onnx-cpu-int4 for a Hugging Face folder)")
    if from_gguf and job.mode == "merged":
        raise LoradeployError(f"profile {job.profile.name} keeps the GGUF base's blocks as they are, so the adapter "
                              "cannot be folded into them: use --mode swappable")
    cache = cache_dir() / "genai-builder"
    with tempfile.TemporaryDirectory(prefix="loradeploy-hf-") as tmp:
        if job.mode == "merged":
            (entry,) = job.adapters
            check_slots(job, _expected_slots(job.base_model))
            begin(step, "folding the adapter into the base, written as a Hugging Face folder for the builder")
            src = Path(tmp) / "hf"
            merge_into(copy.deepcopy(job.base_model), entry.pruned).save_pretrained(str(src))
            load_tokenizer(job.base_dir).save_pretrained(str(src))
        else:
            if not Path(job.base_dir).is_dir():
                begin(step, "the GGUF base as a Hugging Face folder for the builder (converted once, then cached)")
            src = hf_folder(job.base_dir, job.base_model)
        begin(step, f"building the {PRECISIONS[precision]} decoder (onnxruntime-genai model builder)")
        build_decoder(src, Path(tmp) / "build" if from_gguf else out, precision, cache)
        step(f"built the {PRECISIONS[precision]} decoder")
        if from_gguf:
            begin(step, "transcoding the GGUF's blocks into MatMulNBits")
            transcoded = _transcode_build(Path(tmp) / "build", out, job.base_dir)
            step("transcoded the GGUF's blocks")
    special_tokens = write_special_tokens(out, load_tokenizer(job.base_dir))  # for onnxruntime-genai's tokenizer
    path = out / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    sites = lora_sites(model)
    decisions = {"graph_builder": f"onnxruntime-genai {builder_version()} model builder", "architecture": arch,
                 "kv_cache": "inputs past_key_values.N.key/value, outputs present.N.key/value",
                 "packed_qkv": any(n.endswith("/qkv_proj/MatMul") or "/qkv_proj/MatMul_Q" in n for n in sites),
                 "base_precision": precision,
                 "builder_options": builder_options(precision), "tokenizer_special_tokens": special_tokens,
                 "quantized_ops": sorted({n.op_type for n in model.graph.node if n.op_type in ("MatMulNBits",
                                                                                               "GatherBlockQuantized")})}
    if from_gguf:
        counts: dict[str, int] = {}
        for kind in transcoded.values():
            bits, block = kind.split("/")
            counts[f"{bits}-bit block {block}"] = counts.get(f"{bits}-bit block {block}", 0) + 1
        decisions.update({"base_weights": "the GGUF's blocks (Q5_0/Q6_K/Q8_0 exact as 8-bit MatMulNBits, Q4_K on an "
                                          "8-bit grid 8x finer than its own)", "transcoded_nodes": dict(sorted(counts.items()))})
    if job.mode == "merged":
        return decisions
    shapes = projection_shapes(job.base_model, sites)
    check_slots(job, shapes)
    shapes = _chosen(job, shapes, sites)
    slots = add_lora_slots(model, shapes)
    norms = add_norm_inputs(model, out, job.base_model, graph_norms(job))
    qualified = {m: m for m in slots}
    formats = slot_formats(job, qualified, {m: shapes[m] for m in slots})
    lower_inputs(model, formats)
    defaults = dict(norms)
    for name, (fmt, role, n) in formats.items():
        defaults.update(default_arrays(name, role, fmt, n))
    set_defaults(model, defaults)
    onnx.save(model, str(path))
    (out / ADAPTER_DIR).mkdir()
    for entry in job.adapters:
        tensors = lora_factors(entry.pruned, qualified) if entry.quantized is None else \
            lora_inputs(entry, qualified, formats)
        tensors.update(norm_tensors(entry.pruned, job.base_model, norms))
        write_adapter_file(tensors, out / ADAPTER_DIR / f"{entry.name}.onnx_adapter")
    counts: dict[str, int] = {}
    for fmt, _, _ in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    decisions.update(lora_slot_decisions(job.slots, {m: shapes[m] for m in slots}))
    decisions.update({"rank_dimension": "dynamic per module",
                      "lora_precision": dict(sorted(counts.items())),
                      "graph_inputs_overridable": sorted(defaults),
                      "norm_inputs": len(norms)})
    if any(fmt != "fp32" for fmt, _, _ in formats.values()):
        decisions["lora_input_formats"] = {n: f for n, (f, _, _) in sorted(formats.items())}
    return decisions
