"""The ONNX Runtime plugin: everything loradeploy knows about ONNX Runtime lives in this folder.
ONNX Runtime, and onnxruntime-genai for causal LMs.

* exporter.py: writes merged or swappable artifacts (encoders); lm_exporter.py + gguf_decoder.py: decoder LMs
* lora_inputs.py: the slots' arrays and their storage formats (the traced graph: loradeploy/traced_graph.py)
* genai_tokenizer.py: the tokenizer files onnxruntime-genai reads
* session.py, decoder.py, ort.py: the one loader (encoders; the KV-cache decoder of LMs; session options)

This module is data only (its :class:`~loradeploy.registry.RuntimeSpec`); the runtime's packages
are imported by the modules above, when the registry loads them.
"""

from ...kinds import Task
from ...registry import LoraStorage, RuntimeOption, RuntimeSpec

SPEC = RuntimeSpec(
    name="onnxruntime", distribution="onnxruntime", packages=("onnxruntime", "onnx"),
    precisions=("fp32", "int8-dynamic", "int4", "gguf"),
    storage=LoraStorage(ladder=("fp32", "fp16", "int8", "lut4", "int4"), accepted=("fp32", "fp16", "int8", "lut4", "int4"),
                        by_bits={32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}, folds_scale=True, b_rank_major=True),
    adapter_suffix=".onnx_adapter", target="loradeploy.plugins.onnxruntime.exporter:OnnxTarget",
    session="loradeploy.plugins.onnxruntime.session:OrtSession",
    options=(RuntimeOption("execution_provider", "CPUExecutionProvider", "onnxruntime execution provider"),
             RuntimeOption("opset", 17, "ONNX opset of the exported encoder graphs")),
    # causal LMs: the genai builder's decoder in fp32 / int4, or on a GGUF base's own blocks (lm_exporter.py)
    tasks={"fp32": tuple(t.value for t in Task), "int8-dynamic": (Task.SEQUENCE_CLASSIFICATION.value,
                                                                  Task.FEATURE_EXTRACTION.value),
           "int4": tuple(t.value for t in Task), "gguf": (Task.CAUSAL_LM.value,)})

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"  # causal LMs: onnxruntime-genai's description of the decoder
