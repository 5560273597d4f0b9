"""The onnx-web plugin: a static web bundle run by onnxruntime-web's WebAssembly backend, in a
browser or in Node. One base graph whose LoRA slots, LayerNorm weights and head are plain graph
inputs (onnxruntime-web refuses to feed an input that is also an initializer); every adapter is a
safetensors file whose tensors the bundle's ``loradeploy.mjs`` feeds to those inputs.

* exporter.py: writes the bundle (quantized_base.py: the int8 base, its word embedding in 4-bit blocks;
  bundle.py: its web files — web.json, onnxruntime-web, the tokenizer library, loradeploy.mjs,
  index.html — copied from the repository's ``web/`` package)
* node.py: Node and the ``web/`` package (where they are, one persistent worker process)
* session.py: the one loader — the bundle's own ``loradeploy.mjs`` in Node, driven over a pipe
* browser.py: the same inputs through ``index.html`` in headless Chromium, against Node's outputs
* lm_bundle.py, lm_session.py: causal LMs (``onnx-web-int4``): the ONNX Runtime target's int4 decoder,
  asked of it through the registry and rewritten for the page; generation with the KV cache (``lm.mjs``)

This module is data only (its :class:`~loradeploy.registry.RuntimeSpec`).
"""

from ...kinds import Task
from ...registry import LoraStorage, RuntimeOption, RuntimeSpec

SPEC = RuntimeSpec(
    name="onnx-web", distribution="onnxruntime-web", packages=("onnx", "onnxruntime", "safetensors"),
    precisions=("fp32", "int8-dynamic", "int4"),
    storage=LoraStorage(ladder=("fp32",), accepted=("fp32",), by_bits={32: "fp32"}, folds_scale=True,
                        b_rank_major=True),
    adapter_suffix=".safetensors", target="loradeploy.plugins.onnx_web.exporter:WebTarget",
    session="loradeploy.plugins.onnx_web.session:NodeWebSession",
    options=(RuntimeOption("opset", 17, "ONNX opset of the exported encoder graph"),),
    tasks={**{p: (Task.SEQUENCE_CLASSIFICATION.value, Task.FEATURE_EXTRACTION.value) for p in ("fp32", "int8-dynamic")},
           "int4": (Task.CAUSAL_LM.value,)})  # int4: the decoder LM bundle (lm_bundle.py)

MODEL_FILE = "model.onnx"
BASE_TENSORS = "base.safetensors"  # the base's values of the travelling inputs (norms, head)
WEB_CONFIG = "web.json"  # what loradeploy.mjs reads: inputs, slots, files
FORMAT, FORMAT_VERSION = "loradeploy-web", 1
#: the one safetensors metadata key of a bundle's tensor files; its value is a JSON object with sorted
#: keys (format, format_version, base_fingerprint, adapter): safetensors writes several metadata keys
#: in a random order, so one key keeps equal files byte-equal (sha256, fleet de-duplication)
METADATA_KEY = "loradeploy"


def file_metadata(**fields) -> dict[str, str]:
    """The safetensors metadata of a bundle's tensor file: ``{METADATA_KEY: sorted JSON}``."""
    import json

    return {METADATA_KEY: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **fields}, sort_keys=True)}


def read_file_metadata(raw: dict | None) -> dict:
    """The fields of :func:`file_metadata` from a file's metadata (``{}`` when absent or not JSON)."""
    import json

    try:
        fields = json.loads((raw or {}).get(METADATA_KEY, "{}"))
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}
