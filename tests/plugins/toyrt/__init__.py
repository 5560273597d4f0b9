"""A runtime plugin from outside loradeploy, for tests: PyTorch eager on a merged transformers
folder (safetensors). It registers through the entry-point group ``loradeploy.plugins`` as a
separately installed distribution would; this module is data only."""

from loradeploy.kinds import Task
from loradeploy.registry import LoraStorage, RuntimeSpec

SPEC = RuntimeSpec(
    name="torch-eager", distribution="toyrt", packages=("toyrt", "torch"), precisions=("fp32",),
    storage=LoraStorage(ladder=("fp32",), accepted=("fp32",), by_bits={32: "fp32"}, folds_scale=True,
                        b_rank_major=False),
    adapter_suffix="", target="toyrt.exporter:TorchTarget", session="toyrt.session:TorchSession",
    tasks={"fp32": (Task.SEQUENCE_CLASSIFICATION.value, Task.FEATURE_EXTRACTION.value)})
