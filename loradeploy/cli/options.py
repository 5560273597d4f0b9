"""Options and small helpers the ``loradeploy`` commands share: adapter reading, precision plans,
ungated runs, the fleet socket, and printing a record (JSON or the renderer's text)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..kinds import Method

METHODS = click.Choice([m.value for m in Method])


def read_options(lora_alpha, lora_r, head):
    from ..adapters import ReadOptions

    return ReadOptions(lora_alpha=lora_alpha, lora_r=lora_r, head=Path(head) if head else None)


def adapter_inputs(specs, method, lora_alpha, lora_r, head):
    from ..job import AdapterInputs, AdapterSpec

    return AdapterInputs(tuple(AdapterSpec.parse(a) for a in specs), Method(method) if method else None,
                         read_options(lora_alpha, lora_r, head))


def plan_config(plan, budget, max_bytes, calibration, ranks=True, peft_anchor=False, output_aware=True):
    from ..quantize import PlanConfig

    return PlanConfig.parse(plan, budget=budget, max_bytes=max_bytes,
                            calibration=Path(calibration) if calibration else None, ranks=ranks,
                            peft_anchor=peft_anchor, output_aware=output_aware)


def adapter_options(f):
    """Options every command that reads an adapter takes."""
    f = click.option("--head", type=click.Path(dir_okay=False),
                     help="Classifier head (safetensors/.bin) for formats that do not store one (SoRA).")(f)
    f = click.option("--lora-r", type=int, help="SoRA: lora_r when no lora_config.json is beside the file.")(f)
    f = click.option("--lora-alpha", type=float,
                     help="lora_alpha when the checkpoint does not store it (SoRA default: 16).")(f)
    f = click.option("--format", "method", type=METHODS,
                     help="Adapter format; detected from the checkpoint when omitted.")(f)
    return f


def allow_ungated_option(f):
    """For the verbs that validate: a run no budget of the profile applies to passes (else exit 1)."""
    return click.option("--allow-ungated", is_flag=True, help="Pass even when no budget of the profile applies to "
                        "the validation (by default such a run exits 1: nothing gated).")(f)


def prune_config(tolerance):
    from ..prune import PruneConfig

    try:
        return PruneConfig(tolerance=tolerance)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tolerance")


def plan_options(f):
    """Options choosing how adapter tensors are stored (export, quantize)."""
    f = click.option("--calibration", type=click.Path(dir_okay=False),
                     help="Calibration texts for a learned plan (JSON lines or .txt); default: the examples' "
                          "training texts (never the eval set). The first 64 (LM: 8) calibrate; the next 512 "
                          "(LM: 8), where the file has them, are held out: the plan must hold on them too.")(f)
    f = click.option("--peft-anchor", is_flag=True,
                     help="Learned plan: also measure PEFT's convert_to_lora (per-layer rank by energy threshold, "
                          "fp16) at thresholds 0.5-0.99 on the same calibration inputs; the report's bytes-vs-"
                          "fidelity plot shows them beside the uniform plans and the learned one (~2 s per "
                          "threshold).")(f)
    f = click.option("--ranks/--no-ranks", default=True, show_default=True,
                     help="Learned plan: also lower module ranks (ΔW re-factored by SVD in float64), chosen with "
                          "the formats by measured error per byte saved; the manifest records each truncated "
                          "module's rank and the share of ‖ΔW‖² kept.")(f)
    f = click.option("--output-aware/--nearest", "output_aware", default=True, show_default=True,
                     help="Learned plan: choose integer codes (int8/int4/lut4: OPTQ's sequential rounding) and "
                          "truncated ranks (SVD of ΔW·L, L Lᵀ = XᵀX) against each module's calibration inputs X, "
                          "for less output error in the same bytes; --nearest: nearest rounding, plain SVD. "
                          "Nearest-rounded uniform plans stay candidates either way.")(f)
    f = click.option("--max-bytes", type=click.IntRange(min=1),
                     help="Learned plan: the least error within this many adapter bytes (instead of --budget).")(f)
    f = click.option("--budget", metavar="[MEASURE=]VALUE",
                     help="Learned plan: fidelity budget of the adapter's quantization against the fp32 adapter "
                          "(classifier mean_abs_logit, default 0.01; embeddings cosine_distance, 1e-4; "
                          "LM kl_mean, 0.002).")(f)
    return f


def socket_option(f):
    """The resident fleet worker's socket, for the verbs that serve on it or talk to it."""
    return click.option("--socket", "socket_file", envvar="LORADEPLOY_FLEET_SOCKET", type=click.Path(dir_okay=False),
                        help="The resident worker's socket (default: $LORADEPLOY_FLEET_SOCKET, else "
                             "loradeploy-UID/fleet.sock in the temporary folder).")(f)


def emit(record: dict, as_json: bool, printer) -> None:
    """Print ``record`` as JSON, or through ``printer`` (a renderer of :mod:`loradeploy.render`)."""
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        printer(record)
