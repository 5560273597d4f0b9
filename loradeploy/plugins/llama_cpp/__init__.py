"""The llama.cpp plugin: everything loradeploy knows about llama.cpp lives in this folder.
GGUF files, run through llama-cpp-python; written with gguf.

* exporter.py: writes adapter GGUFs beside the base, or a merged GGUF
* header.py: reads a GGUF's header without loading it
* session.py: the one loader; measure.py: latency; reference.py: the fp32 reference of a GGUF base
* formats.py: the GGML block types a plan may store LoRA tensors in

This module is data only (its :class:`~loradeploy.registry.RuntimeSpec`); the runtime's packages
are imported by the modules above, when the registry loads them.
"""

from ...kinds import Task
from ...registry import LoraStorage, RuntimeSpec

SPEC = RuntimeSpec(
    name="llama.cpp", distribution="llama-cpp-python", packages=("llama-cpp-python", "gguf"),
    precisions=("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
    storage=LoraStorage(ladder=("f32", "f16", "q8_0", "q5_0", "q4_0"),
                        accepted=("f32", "f16", "q8_0", "q5_0", "q4_0", "q5_1", "q4_1"),
                        by_bits={32: "f32", 16: "f16", 8: "q8_0", 5: "q5_0", 4: "q4_0"},
                        folds_scale=True, b_rank_major=False,
                        # ggml-cpu's vec_dot_type: an F16 weight multiplies the input rounded to
                        # f16, every block type the input quantized to 8-bit blocks of 32 (Q8_0;
                        # Q8_1 for q5_1/q4_1 holds the same codes and scale)
                        activations={"f16": "f16", "q8_0": "q8_0", "q5_0": "q8_0", "q4_0": "q8_0",
                                     "q5_1": "q8_0", "q4_1": "q8_0"}),
    adapter_suffix=".gguf", target="loradeploy.plugins.llama_cpp.exporter:GgufTarget",
    session="loradeploy.plugins.llama_cpp.session:LlamaSession", formats="loradeploy.plugins.llama_cpp.formats",
    tasks={p: (Task.CAUSAL_LM.value,) for p in ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")})  # a GGUF base
