"""The ``loradeploy`` command group and its commands on one adapter or artifact: inspect, prune,
export, quantize, validate, verify, check, ab, targets (the fleet's: :mod:`.fleet_commands`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import __version__
from ..kinds import Method
from ..logs import quiet_third_party_logs
from .options import (adapter_inputs, adapter_options, allow_ungated_option, emit, plan_config, plan_options,
                      prune_config, read_options)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loradeploy")
@click.option("-v", "--verbose", is_flag=True, help="Also show other libraries' warnings (they are kept at ERROR).")
def cli(verbose):
    """Ship trained rank-adaptive LoRA adapters (SoRA, IncreLoRA, Bayesian-LoRA, PEFT) to edge
    runtimes: read, prune exactly, quantize, export, validate.

    Exit codes: 0 ok; 1 a measure outside its budget, no budget applying (nothing gated), a
    regression or a failing file; 2 bad input; 3 an internal error (a bug). Set LORADEPLOY_DEBUG=1
    to see tracebacks."""
    if verbose:
        quiet_third_party_logs(verbose=True)


@cli.command("inspect")
@click.argument("path", type=click.Path())
@adapter_options
@click.option("--tolerance", type=float, default=0.0, show_default=True,
              help="Also count ranks whose share of ΔW (Frobenius) is at most this as prunable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect_cmd(path, method, lora_alpha, lora_r, head, tolerance, as_json):
    """Show an adapter: detected format, modules, rank before → after exact pruning, sizes."""
    from ..pipeline import inspect_adapter
    from ..render import print_inspect

    record = inspect_adapter(Path(path), Method(method) if method else None,
                             read_options(lora_alpha, lora_r, head), prune_config(tolerance))
    emit(record, as_json, print_inspect)


@cli.command("prune")
@click.argument("path", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: a PEFT LoRA adapter (adapter_config.json + safetensors).")
@adapter_options
@click.option("--tolerance", type=float, default=0.0, show_default=True,
              help="Also drop ranks whose share of ΔW (Frobenius) is at most this; 0 keeps ΔW exact.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prune_cmd(path, out, method, lora_alpha, lora_r, head, tolerance, overwrite, as_json):
    """Drop the ranks the method zeroed (ΔW unchanged) and write a PEFT LoRA folder."""
    from ..pipeline import prune_adapter
    from ..render import print_prune

    record = prune_adapter(Path(path), Path(out), Method(method) if method else None,
                           read_options(lora_alpha, lora_r, head), prune_config(tolerance), overwrite)
    emit(record, as_json, print_prune)

@cli.command("export")
@click.option("--base", required=True, help="Base model: a Hugging Face model folder, a GGUF file (llama.cpp targets; causal LMs on onnx-cpu-gguf) or a built-in alias: minilm (all-MiniLM-L6-v2), gemma3-270m (Gemma 3 270M Q4_K_M GGUF).")
@click.option("--adapter", "adapters", required=True, multiple=True, metavar="[NAME=]PATH",
              help="Adapter checkpoint (file or folder); repeat for several adapters in one swappable artifact.")
@click.option("--target", required=True, help="Target profile name (see `loradeploy targets`) or a .yaml path.")
@click.option("--mode", metavar="[merged|swappable|auto]",
              help="Default: the profile's. auto: merged if that passes the fidelity budget, else swappable (both shown).")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help="JSON lines {text, label}; default: the shipped example set.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@adapter_options
@click.option("--plan", "plan",
              help="Swappable adapters' precision per tensor: `learned` (search under --budget), `uniform:BITS` "
                   "(32/16/8/4 as the target stores them) or a plan file from `loradeploy quantize`. "
                   "Default: the profile's plan, else the adapter's tensors as trained.")
@plan_options
@click.option("--slots", metavar="LIST",
              help="Swappable: which modules of the base take LoRA inputs, so other adapters of the base load later. "
                   "Comma-separated: `blocks` (every linear layer of every layer block: attention and MLP), "
                   "`norms` (every LayerNorm's weight and bias an input, defaulting to the base's), "
                   "`adapters` (only the given adapters' modules: fewer nodes), or module names / name suffixes "
                   "(`query`, `bert.pooler.dense`). The given adapters' modules always get slots. "
                   "Default: the profile's (blocks,norms).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@allow_ungated_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(base, adapters, target, mode, eval_path, out, method, lora_alpha, lora_r, head, plan, budget,
               max_bytes, ranks, output_aware, peft_anchor, calibration, slots, overwrite, allow_ungated, as_json):
    """Export adapters on a base for a target, validate there, write manifest + report.

    Exits 1 when a validation measure is outside the profile's budget, or no budget applies."""
    from ..export import ExportConfig, export
    from ..render import print_export, progress_steps

    config = ExportConfig(base, adapter_inputs(adapters, method, lora_alpha, lora_r, head), target, Path(out), mode,
                          Path(eval_path) if eval_path else None,
                          plan_config(plan, budget, max_bytes, calibration, ranks, peft_anchor, output_aware),
                          overwrite, slots, allow_ungated)
    with progress_steps() as step:
        record = export(config, step)
    emit(record, as_json, print_export)
    return 0 if record["validation"]["passed"] else 1


@cli.command("quantize")
@click.option("--base", required=True, help="Base model: a Hugging Face model folder, a GGUF file (llama.cpp targets; causal LMs on onnx-cpu-gguf) or a built-in alias: minilm (all-MiniLM-L6-v2), gemma3-270m (Gemma 3 270M Q4_K_M GGUF).")
@click.option("--adapter", "adapters", required=True, multiple=True, metavar="[NAME=]PATH",
              help="Adapter checkpoint; repeat for several (one plan entry each).")
@click.option("--target", required=True, help="Target profile: its runtime decides the formats a tensor can take.")
@click.option("--plan", "plan", default="learned", show_default=True,
              help="`learned`, or `uniform:BITS` for the uniform baseline.")
@plan_options
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Plan file to write (JSON).")
@adapter_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def quantize_cmd(base, adapters, target, plan, budget, max_bytes, ranks, output_aware, peft_anchor, calibration, out,
                 method, lora_alpha, lora_r, head, overwrite, as_json):
    """Learn a per-tensor precision plan for adapters on a base and target.

    Measures each tensor's sensitivity on calibration inputs, lowers precisions greedily by
    error per byte saved, checks whole plans end to end and backs off to the largest saving
    within the budget; the plan is then measured on held-out texts, and backed off further if
    it does not hold there (1.5 × the budget). A B-LoRA adapter's learned bit widths are
    measured as the starting plan.
    Use the plan with `loradeploy export --plan FILE`."""
    from ..quantize import QuantizeConfig, quantize
    from ..render import print_plan, progress_steps

    config = QuantizeConfig(base, adapter_inputs(adapters, method, lora_alpha, lora_r, head), target, Path(out),
                            plan_config(plan, budget, max_bytes, calibration, ranks, peft_anchor, output_aware),
                            overwrite)
    with progress_steps() as step:
        record = quantize(config, step)
    emit(record, as_json, print_plan)


@cli.command("validate")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help="JSON lines {text, label}; default: the shipped example set.")
@allow_ungated_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate_cmd(artifact, eval_path, allow_ungated, as_json):
    """Validate an exported artifact again against the fp32 reference (exit 1 on FAIL, nothing gated or a changed file)."""
    from ..render import print_validation, progress_steps
    from ..validate import ValidateConfig, revalidate

    with progress_steps() as step:
        record = revalidate(ValidateConfig(Path(artifact), Path(eval_path) if eval_path else None, allow_ungated),
                            step)
    emit(record, as_json, print_validation)
    return 0 if record["validation"]["passed"] else 1


@cli.command("verify")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--no-load", is_flag=True, help="Check files only; do not load the artifact in its runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(artifact, no_load, as_json):
    """Check an artifact against its manifest: every file's size and sha256, none missing or extra, the
    manifest's own sha256, each file sane for its format, and (unless --no-load) that it loads and
    runs in its runtime. Exit 0 when all holds, 1 naming each file that fails, 2 when ARTIFACT is not one."""
    from ..render import print_verify
    from ..verify import verify

    record = verify(Path(artifact), load=not no_load)
    emit(record, as_json, print_verify)
    return 0 if record["ok"] else 1


@cli.command("check")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--baseline", required=True, type=click.Path(),
              help="Baseline manifest.json, or a baseline artifact folder.")
@click.option("--tolerance", metavar="fidelity=F,latency=L,size=S",
              help="Relative slack per kind (default fidelity=0.01,latency=0.25,size=0.01). A fidelity change "
                   "within its noise floor (2% of the profile's budget, see README) always passes. Latency is "
                   "the fastest call over the runtime's reference unit timed in the same process.")
@click.option("--strict-latency", is_flag=True,
              help="Compare latency even when the baseline was measured on another CPU, runtime version or "
                   "thread count (by default such rows are INFO).")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help="Eval set (default: the shipped one).")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write JUnit XML: one test case per measure.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write a Markdown table for a pull-request comment.")
@allow_ungated_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_cmd(artifact, baseline, tolerance, strict_latency, eval_path, junit, markdown, allow_ungated, as_json):
    """CI gate: validate ARTIFACT again and compare with a baseline. Fidelity may not get worse
    beyond the tolerance and its noise floor, size may not grow, and latency (relative to the
    runtime's reference unit) may not grow — compared only against a baseline measured on a
    matching machine fingerprint, else shown as INFO. Exit 0 pass, 1 regression, nothing gated or a changed file, 2 error."""
    from ..check import CheckConfig, check, junit_xml, markdown as to_markdown
    from ..fsutil import write_text_atomic
    from ..render import print_check, progress_steps

    config = CheckConfig(Path(artifact), Path(baseline), tolerance, Path(eval_path) if eval_path else None,
                         strict_latency, allow_ungated)
    with progress_steps() as step:
        record = check(config, step)
    if junit:
        write_text_atomic(Path(junit), junit_xml(record))
    if markdown:
        write_text_atomic(Path(markdown), to_markdown(record))
    emit(record, as_json, print_check)
    return 0 if record["passed"] else 1


@cli.command("ab")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--arm", "arms", required=True, multiple=True, metavar="NAME=PATH", help="An arm and its adapter (a "
              "swappable artifact's adapters/FILE, an adapter name of ARTIFACT, or - for the base alone); repeat per arm.")
@click.option("--weights", help="Traffic share per arm, in --arm order (e.g. 50,50); default: equal.")
@click.option("--inputs", "inputs", required=True, type=click.Path(dir_okay=False),
              help="Requests: JSON lines {text} or a .txt file, one per line.")
@click.option("--keys", type=click.Path(dir_okay=False), help="One user key per line (per request); an arm is "
              "chosen by sha256 of the key. Default: the line number.")
@click.option("--labels", help="Class names in label-id order (e.g. neg,pos); default: the adapter config's id2label "
              "(kept in the manifest), else the label ids.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=16, help="LMs: greedy tokens per request (16).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ab_cmd(artifact, arms, weights, inputs, keys, labels, max_new_tokens, as_json):
    """Serve requests through an A/B test of adapters on one loaded base.

    Prints each request's arm and answer (class name or generated text), then a summary per arm."""
    from ..render import print_ab, progress_steps
    from ..runtime.ab import ab_test, parse_arms, parse_labels, parse_weights

    arm_map = parse_arms(list(arms))
    with progress_steps() as step:
        record = ab_test(Path(artifact), arm_map, parse_weights(weights, len(arm_map)), Path(inputs),
                         Path(keys) if keys else None, step, parse_labels(labels), max_new_tokens)
    emit(record, as_json, print_ab)

@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_cmd(as_json):
    """List the target profiles (built-in and from LORADEPLOY_TARGETS folders)."""
    from ..manifest import profile_dict
    from ..render import print_targets
    from ..profile import load_profile, profile_paths

    profiles = [profile_dict(load_profile(str(p))) for p in profile_paths().values()]
    if as_json:
        click.echo(json.dumps(profiles, indent=2))
    else:
        print_targets(profiles)
