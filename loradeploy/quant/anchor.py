"""PEFT's own re-factoring as the anchor a learned plan is held against: ``peft.convert_to_lora``
(peft ≥ 0.18) re-factors a LoRA by SVD with each layer's rank chosen by an energy threshold. For
each threshold the ranks it chooses are measured by the plan search's evaluator — ΔW truncated to
those ranks (the best rank-k approximation convert_to_lora computes), stored at the runtime's
16-bit format as PEFT saves it — so the anchor and the plans are measured the same way, on the
same calibration inputs. Costs one ``convert_to_lora`` call (~1.6 s for a MiniLM adapter) and
one forward pass per threshold, hence opt-in (``--peft-anchor``)."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

from ..errors import LoradeployError
from ..ir import AdapterSet
from .plan import ROLES, tensor_key

#: energy thresholds (share of each layer's ‖ΔW‖² kept) spanning PEFT's useful range
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def peft_ranks(base_model, adapters: AdapterSet, thresholds=THRESHOLDS) -> dict[float, dict[str, int]]:
    """threshold → module → the rank ``peft.convert_to_lora`` keeps for it."""
    try:
        from peft import PeftModel, convert_to_lora
    except ImportError as e:
        raise LoradeployError(f"--peft-anchor needs peft >= 0.18 (convert_to_lora): {e}") from e
    from ..adapters import peft as peft_format

    with tempfile.TemporaryDirectory(prefix="loradeploy-peft-anchor-") as folder:
        peft_format.write(adapters, Path(folder))
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), folder).eval()
        out = {}
        for t in thresholds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "converting a LoRA to LoRA": here that is the point
                config, _state = convert_to_lora(model, t)
            pattern = dict(config.rank_pattern or {})
            out[t] = {n: min(int(pattern.get(n, config.r)), m.rank) for n, m in adapters.modules.items()}
    return out


def peft_points(ev, base_model, fmt16: str, thresholds=THRESHOLDS) -> list[dict]:
    """Each threshold's plan measured by ``ev`` (the search's
    :class:`~loradeploy.quant.evaluator.Evaluator` of the same adapter on ``base_model``), its bytes
    counted as the plans' are: ``{"plan", "threshold", "ranks_total", "bytes", <measures>}``."""
    from .formats import quantize
    from .plan import stored_matrix

    points = []
    own, ev.truncation = ev.truncation, "plain"  # PEFT re-factors by the SVD of ΔW itself
    try:
        for t, ranks in peft_ranks(base_model, ev.adapters, thresholds).items():
            formats = {tensor_key(n, r): fmt16 for n in ev.adapters.modules for r in ROLES}
            size = sum(quantize(stored_matrix(ev.module_at(n, ranks[n]), r, ev.storage), fmt16).nbytes
                       for n in ev.adapters.modules for r in ROLES)
            points.append({"plan": f"PEFT convert_to_lora({t})", "threshold": t, "ranks_total": sum(ranks.values()),
                           "bytes": size, **ev.error(formats, ranks)})
    finally:
        ev.truncation = own
    return points
