"""onnx-web target, causal LMs: the swappable int4 decoder as a static web bundle.

The decoder graph is the ONNX Runtime target's (onnxruntime-genai's model builder: GroupQueryAttention
with the KV cache as inputs/outputs, int4 ``MatMulNBits``, LoRA slots and RMSNorm weights as
overridable inputs). onnxruntime-web is onnxruntime compiled to WebAssembly and runs that graph's
contrib operators as they are (measured: every operator of the Llama and Gemma 3 graphs has a wasm
kernel), so this module does not build a decoder of its own: it asks the registry for the
``onnxruntime`` target (a plugin never imports another; the registry loads it by name, as serving
does) to export the same job at int4 into a scratch folder, then rewrites that artifact for the page:

* ``model.onnx``: one file (no external data); every overridable input made a plain input (its
  initializer dropped: onnxruntime-web refuses to feed an input that is also an initializer); every
  ``MatMulNBits`` says ``accuracy_level`` 0 — the wasm kernel computes in fp32 whatever the
  attribute says, so the graph states what runs and onnxruntime CPU computes it the same way;
* ``base.safetensors``: the RMSNorm inputs' defaults (the base's, as the builder stores them);
* ``adapters/<name>.safetensors``: the tensors of the ``.onnx_adapter`` file the ONNX Runtime
  target wrote for that adapter, as they are (scale folded into B, Gemma's norms as 1 + w);
* ``web.json``: the encoder bundle's keys plus ``decoder`` (cache inputs/outputs, heads, vocabulary,
  end-of-sequence ids) and the tokenizer files the builder wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import LoradeployError
from ...manifest import ADAPTER_DIR
from . import BASE_TENSORS, MODEL_FILE, file_metadata
from .bundle import base_fingerprint, web_config, write_config, write_web_files

if TYPE_CHECKING:
    from ...job import ExportJob

#: the runtime whose target builds the decoder graph (onnxruntime-web runs onnxruntime's graphs)
GRAPH_RUNTIME = "onnxruntime"
#: prompts the demo page offers (the shipped LM eval set's first ones)
EXAMPLES = 4
#: the longest prompt + generation a bundle's page is meant for (the KV cache grows to it)
MAX_LENGTH = 512


def _graph_job(job: ExportJob) -> ExportJob:
    """The same job for the ONNX Runtime target at int4 (its profile: this one's, runtime renamed)."""
    from ... import registry

    spec = registry.get(GRAPH_RUNTIME)
    options = {o.name: o.default for o in spec.options}
    profile = dataclasses.replace(job.profile, runtime=GRAPH_RUNTIME, options=options)
    return dataclasses.replace(job, profile=profile)


def _plain_graph(src: Path, dst: Path) -> dict:
    """``src``'s graph written to ``dst`` as one file, overridable inputs plain, MatMulNBits at
    accuracy_level 0; returns the dropped defaults (name → array) and what was changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))  # with its external data
    inputs = {i.name for i in model.graph.input}
    defaults = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in inputs}
    kept = [i for i in model.graph.initializer if i.name not in inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    levels = 0
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level" and attr.i != 0:
                attr.i, levels = 0, levels + 1
    onnx.save(model, str(dst))
    ops = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node})
    return {"defaults": defaults, "accuracy_level_changed": levels, "operators": ops}


def _decoder(build: Path) -> dict:
    """What ``loradeploy.mjs`` needs of the decoder, from the builder's ``genai_config.json``."""
    config = json.loads((build / "genai_config.json").read_text())["model"]
    dec = config["decoder"]
    layers = dec["num_hidden_layers"]
    eos = config.get("eos_token_id")
    names = {k: [dec[side][f"{k}_names"] % i for i in range(layers)]
             for side, ks in (("inputs", ("past_key", "past_value")), ("outputs", ("present_key", "present_value")))
             for k in ks}
    return {"past": [n for i in range(layers) for n in (names["past_key"][i], names["past_value"][i])],
            "present": [n for i in range(layers) for n in (names["present_key"][i], names["present_value"][i])],
            "logits": dec["outputs"]["logits"], "kv_heads": dec["num_key_value_heads"], "head_size": dec["head_size"],
            "vocab_size": int(config["vocab_size"]),
            "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
            "bos_token_id": config.get("bos_token_id")}


def _adapter_file(src: Path, dst: Path, inputs: set[str], metadata: dict) -> None:
    """The ``.onnx_adapter`` file's tensors as a safetensors file (keyed by graph input)."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import save_file

    # the OrtValues view the AdapterFormat's buffer: keep it alive until every array is copied out
    # (copied from a freed one, an adapter's values came out as garbage — measured, 5e23)
    adapter = ort.AdapterFormat.read_adapter(str(src))
    tensors = {k: np.array(v.numpy(), dtype=np.float32, copy=True) for k, v in adapter.get_parameters().items()}
    del adapter
    unknown = sorted(set(tensors) - inputs)
    if unknown:
        raise LoradeployError(f"{src}: tensor {unknown[0]} has no input in the bundle's graph")
    save_file(tensors, str(dst), metadata=metadata)


def export_lm_bundle(job: ExportJob, out: Path, progress=None) -> dict:
    """Write the LM bundle of ``job`` into ``out`` (see the module doc)."""
    from safetensors.numpy import save_file

    from ... import registry
    from ...evaldata import DEFAULT_LM_EVAL
    from ...progress import begin

    step = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="loradeploy-web-lm-") as tmp:
        build = Path(tmp)
        decisions = registry.get(GRAPH_RUNTIME).target_plugin().export(_graph_job(job), build, progress)
        begin(step, "rewriting the decoder for onnxruntime-web (plain inputs, one file)")
        graph = _plain_graph(build / MODEL_FILE, out / MODEL_FILE)
        overridable = set(decisions.get("graph_inputs_overridable", ()))
        if set(graph["defaults"]) != overridable:
            raise LoradeployError(f"{build / MODEL_FILE}: its overridable inputs are not the ones the ONNX Runtime "
                                  "target reported")
        slots, travelling = {}, {}
        for name, value in sorted(graph["defaults"].items()):
            if name.endswith((".lora_A", ".lora_B")):  # defaults [in, 0] / [0, out]
                module, role = name.rsplit(".", 1)
                in_out = slots.setdefault(module, [0, 0])
                in_out[0 if role == "lora_A" else 1] = value.shape[0 if role == "lora_A" else 1]
            else:
                travelling[name] = value
        fingerprint = base_fingerprint(job.base_dir)
        save_file(travelling, str(out / BASE_TENSORS), metadata=file_metadata(base_fingerprint=fingerprint))
        (out / ADAPTER_DIR).mkdir()
        files = {}
        for entry in job.adapters:
            files[entry.name] = f"{ADAPTER_DIR}/{entry.name}.safetensors"
            _adapter_file(build / ADAPTER_DIR / f"{entry.name}.onnx_adapter", out / files[entry.name], overridable,
                          file_metadata(base_fingerprint=fingerprint, adapter=entry.name))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (build / name).is_file():
                shutil.copyfile(build / name, out / name)
        decoder = _decoder(build)
        step("rewrote the decoder for onnxruntime-web")
    config = web_config(task=job.task.value, output=decoder["logits"], base_fingerprint=fingerprint,
                        slots={m: tuple(s) for m, s in slots.items()},
                        travelling={n: list(a.shape) for n, a in travelling.items()}, adapters=files,
                        max_length=MAX_LENGTH, pad_token_id=0, labels=None,
                        examples=DEFAULT_LM_EVAL.read_text().splitlines()[:EXAMPLES])
    write_config(out, {**config, "decoder": decoder})
    keep = {k: v for k, v in decisions.items() if k not in ("graph_inputs_overridable",)}
    return {**keep, "graph_runtime": f"the {GRAPH_RUNTIME} target's decoder, rewritten for onnxruntime-web",
            "graph_inputs_plain": True, "travelling_inputs": len(travelling), "operators": graph["operators"],
            "matmulnbits_accuracy_level": 0, "accuracy_level_changed": graph["accuracy_level_changed"],
            "web_packages": write_web_files(out), "base_fingerprint": fingerprint}
