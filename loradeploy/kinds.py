"""The adapter formats, tasks and artifact modes loradeploy knows, apart from the IR so that code which only
names them (the command line's choices, a resident worker's client) does not import torch."""

from __future__ import annotations

import enum


class Method(str, enum.Enum):
    """The training method an adapter came from (and so how its checkpoint is laid out)."""

    SORA = "sora"
    INCRELORA = "increlora"
    BLORA = "blora"
    PEFT_LORA = "peft-lora"
    PEFT_ADALORA = "peft-adalora"


#: how an artifact holds its adapters; auto: merged if that passes the fidelity budget, else swappable
MODES = ("merged", "swappable", "auto")


class Task(str, enum.Enum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    FEATURE_EXTRACTION = "feature-extraction"
    CAUSAL_LM = "causal-lm"
