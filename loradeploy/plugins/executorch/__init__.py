"""The ExecuTorch plugin: everything loradeploy knows about ExecuTorch (PyTorch's on-device runtime)
lives in this folder. Encoders lowered to the XNNPACK backend, run by executorch's Python runtime.

* exporter.py: writes merged programs (ΔW folded) or one swappable program whose LoRA factors
  (a bounded rank axis per module) and travelling tensors are method inputs
* program.py: torch.export → XNNPACK lowering → ``.pte`` (PyTorch side)
* tensor_data.py: adapter files in ExecuTorch's tensor-data format (``.ptd``), written with
  executorch's own serializer, read with its FlatTensor header and the flatbuffers library
* session.py: the one loader (executorch.runtime; adapters swapped by feeding tensors)
* lm_program.py, lm_exporter.py, lm_session.py: causal LMs as a KV-cache program (prefill and
  decode in one method, LoRA factors as inputs), the target and session that take them

This module is data only (its :class:`~loradeploy.registry.RuntimeSpec`); executorch is imported
by the modules above, when the registry loads them.
"""

from ...kinds import Task
from ...registry import LoraStorage, RuntimeOption, RuntimeSpec

SPEC = RuntimeSpec(
    name="executorch", distribution="executorch", packages=("executorch", "torch"),
    precisions=("fp32", "int8-dynamic"),
    storage=LoraStorage(ladder=("fp32",), accepted=("fp32",), by_bits={32: "fp32"}, folds_scale=True,
                        b_rank_major=True),
    adapter_suffix=".ptd", target="loradeploy.plugins.executorch.lm_exporter:ExecuTorchLmTarget",
    session="loradeploy.plugins.executorch.lm_session:ExecuTorchLmSession",
    options=(RuntimeOption("rank_bound", 16, "swappable: the largest rank a LoRA slot's rank axis may take; an adapter "
                                             "module of higher rank is refused (causal LMs: every slot padded to it)"),
             RuntimeOption("fixed_rank_bound", False, "swappable encoders: every slot's rank axis is bounded by rank_bound "
                                                      "(headroom for adapters exported later) instead of by the "
                                                      "largest rank the exported adapters have at that module"),
             RuntimeOption("max_batch", 64, "the largest batch the program's dynamic batch axis takes")),
    tasks={"fp32": (Task.SEQUENCE_CLASSIFICATION.value, Task.FEATURE_EXTRACTION.value, Task.CAUSAL_LM.value),
           "int8-dynamic": (Task.SEQUENCE_CLASSIFICATION.value, Task.FEATURE_EXTRACTION.value)})

PROGRAM_FILE = "model.pte"
BASE_TENSORS = "base.ptd"  # swappable: the base's values of the travelling inputs (norms, head)
PROGRAM_CONFIG = "executorch.json"  # the program's method inputs, slots, rank bound, base fingerprint
FORMAT, FORMAT_VERSION = "loradeploy-executorch", 1
#: the key of the JSON metadata entry every .ptd this plugin writes holds beside its tensors
META_KEY = "loradeploy.metadata"
