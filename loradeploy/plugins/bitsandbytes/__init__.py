"""The bitsandbytes plugin: everything loradeploy knows about bitsandbytes lives in this folder.
transformers holding a 4- or 8-bit base, PEFT adapters beside it.

* exporter.py: writes the quantized base and one PEFT folder per adapter
* session.py: the one loader

This module is data only (its :class:`~loradeploy.registry.RuntimeSpec`); the runtime's packages
are imported by the modules above, when the registry loads them.
"""

from ...kinds import Task
from ...registry import LoraStorage, RuntimeOption, RuntimeSpec

SPEC = RuntimeSpec(
    name="bitsandbytes", distribution="bitsandbytes", packages=("bitsandbytes",),
    precisions=("nf4", "fp4", "int8"),
    storage=LoraStorage(ladder=("fp32", "fp16"), accepted=("fp32", "fp16", "bf16"), by_bits={32: "fp32", 16: "fp16"},
                        folds_scale=False, b_rank_major=False),
    options=(RuntimeOption("double_quant", False, "4-bit: quantize the quantization constants too"),),
    adapter_suffix="", target="loradeploy.plugins.bitsandbytes.exporter:BnbTarget", session="loradeploy.plugins.bitsandbytes.session:BnbSession",
    tasks={p: tuple(t.value for t in Task) for p in ("nf4", "fp4", "int8")})
