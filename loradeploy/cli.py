"""``loradeploy`` command line: parse, call one library verb, print. The only place that
catches :class:`~loradeploy.errors.LoradeployError`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import LoradeployError
from .kinds import Method
from .logs import DEBUG_ENV, quiet_third_party_logs

_METHODS = click.Choice([m.value for m in Method])


def _read_options(lora_alpha, lora_r, head):
    from .adapters import ReadOptions

    return ReadOptions(lora_alpha=lora_alpha, lora_r=lora_r, head=Path(head) if head else None)


def _adapter_inputs(specs, method, lora_alpha, lora_r, head):
    from .job import AdapterInputs, AdapterSpec

    return AdapterInputs(tuple(AdapterSpec.parse(a) for a in specs), Method(method) if method else None,
                         _read_options(lora_alpha, lora_r, head))


def _plan_config(plan, budget, max_bytes, calibration, ranks=True, peft_anchor=False, output_aware=True):
    from .quantize import PlanConfig

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
    f = click.option("--format", "method", type=_METHODS,
                     help="Adapter format; detected from the checkpoint when omitted.")(f)
    return f


def allow_ungated_option(f):
    """For the verbs that validate: a run no budget of the profile applies to passes (else exit 1)."""
    return click.option("--allow-ungated", is_flag=True, help="Pass even when no budget of the profile applies to "
                        "the validation (by default such a run exits 1: nothing gated).")(f)


def _prune_config(tolerance):
    from .prune import PruneConfig

    try:
        return PruneConfig(tolerance=tolerance)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tolerance")


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
    from .pipeline import inspect_adapter
    from .render import print_inspect

    record = inspect_adapter(Path(path), Method(method) if method else None,
                             _read_options(lora_alpha, lora_r, head), _prune_config(tolerance))
    _emit(record, as_json, print_inspect)


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
    from .pipeline import prune_adapter
    from .render import print_prune

    record = prune_adapter(Path(path), Path(out), Method(method) if method else None,
                           _read_options(lora_alpha, lora_r, head), _prune_config(tolerance), overwrite)
    _emit(record, as_json, print_prune)


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
                   "`adapters` (only the given adapters' modules: fewer nodes), or module names / name suffixes "
                   "(`query`, `bert.pooler.dense`). The given adapters' modules always get slots. "
                   "Default: the profile's (blocks).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@allow_ungated_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(base, adapters, target, mode, eval_path, out, method, lora_alpha, lora_r, head, plan, budget,
               max_bytes, ranks, output_aware, peft_anchor, calibration, slots, overwrite, allow_ungated, as_json):
    """Export adapters on a base for a target, validate there, write manifest + report.

    Exits 1 when a validation measure is outside the profile's budget, or no budget applies."""
    from .export import ExportConfig, export
    from .render import print_export, progress_steps

    config = ExportConfig(base, _adapter_inputs(adapters, method, lora_alpha, lora_r, head), target, Path(out), mode,
                          Path(eval_path) if eval_path else None,
                          _plan_config(plan, budget, max_bytes, calibration, ranks, peft_anchor, output_aware),
                          overwrite, slots, allow_ungated)
    with progress_steps() as step:
        record = export(config, step)
    _emit(record, as_json, print_export)
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
    from .quantize import QuantizeConfig, quantize
    from .render import print_plan, progress_steps

    config = QuantizeConfig(base, _adapter_inputs(adapters, method, lora_alpha, lora_r, head), target, Path(out),
                            _plan_config(plan, budget, max_bytes, calibration, ranks, peft_anchor, output_aware),
                            overwrite)
    with progress_steps() as step:
        record = quantize(config, step)
    _emit(record, as_json, print_plan)


@cli.command("validate")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help="JSON lines {text, label}; default: the shipped example set.")
@allow_ungated_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate_cmd(artifact, eval_path, allow_ungated, as_json):
    """Validate an exported artifact again against the fp32 reference (exit 1 on FAIL, nothing gated or a changed file)."""
    from .render import print_validation, progress_steps
    from .validate import ValidateConfig, revalidate

    with progress_steps() as step:
        record = revalidate(ValidateConfig(Path(artifact), Path(eval_path) if eval_path else None, allow_ungated),
                            step)
    _emit(record, as_json, print_validation)
    return 0 if record["validation"]["passed"] else 1


@cli.command("verify")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--no-load", is_flag=True, help="Check files only; do not load the artifact in its runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(artifact, no_load, as_json):
    """Check an artifact against its manifest: every file's size and sha256, none missing or extra, the
    manifest's own sha256, each file sane for its format, and (unless --no-load) that it loads and
    runs in its runtime. Exit 0 when all holds, 1 naming each file that fails, 2 when ARTIFACT is not one."""
    from .render import print_verify
    from .verify import verify

    record = verify(Path(artifact), load=not no_load)
    _emit(record, as_json, print_verify)
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
    from .check import CheckConfig, check, junit_xml, markdown as to_markdown
    from .fsutil import write_text_atomic
    from .render import print_check, progress_steps

    config = CheckConfig(Path(artifact), Path(baseline), tolerance, Path(eval_path) if eval_path else None,
                         strict_latency, allow_ungated)
    with progress_steps() as step:
        record = check(config, step)
    if junit:
        write_text_atomic(Path(junit), junit_xml(record))
    if markdown:
        write_text_atomic(Path(markdown), to_markdown(record))
    _emit(record, as_json, print_check)
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
    from .render import print_ab, progress_steps
    from .runtime.ab import ab_test, parse_arms, parse_labels, parse_weights

    arm_map = parse_arms(list(arms))
    with progress_steps() as step:
        record = ab_test(Path(artifact), arm_map, parse_weights(weights, len(arm_map)), Path(inputs),
                         Path(keys) if keys else None, step, parse_labels(labels), max_new_tokens)
    _emit(record, as_json, print_ab)


@cli.group("fleet")
def fleet_group():
    """Many adapters × targets from one spec: each (adapter, target) a unit keyed by the sha256
    of its inputs, skipped when its artifact is up to date; the base's graph built once per
    target; a local process pool by default, shards for CI matrices, Ray for clusters.

    Spec (YAML): base, adapters (paths and globs), targets, and optionally mode, plan, eval,
    slots, resources. See `loradeploy fleet run --help` and examples/fleet.yaml."""


def socket_option(f):
    """The resident fleet worker's socket, for the verbs that serve on it or talk to it."""
    return click.option("--socket", "socket_file", envvar="LORADEPLOY_FLEET_SOCKET", type=click.Path(dir_okay=False),
                        help="The resident worker's socket (default: $LORADEPLOY_FLEET_SOCKET, else "
                             "loradeploy-UID/fleet.sock in the temporary folder).")(f)


@fleet_group.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Fleet output folder (TARGET/ADAPTER artifacts, index.json, index.html, junit.xml); a re-run "
                   "into it redoes only the units whose inputs changed.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine. ray: Ray tasks on a local cluster, or on RAY_ADDRESS "
                   "(needs loradeploy[ray]).")
@click.option("--workers", type=click.IntRange(min=1),
              help="local: pool processes (default: as many as the units' runtime threads fill the cores — one "
                   "for profiles with threads 0, which take every core; 1 runs in this process). ray: CPUs of "
                   "the local cluster it starts.")
@click.option("--shard", metavar="I/N", help="Run only shard I of N (a fixed partition by unit id; merge the N "
                                             "outputs with `loradeploy fleet merge`).")
@click.option("--force", is_flag=True, help="Run every unit, even those up to date.")
@click.option("--in-process", is_flag=True,
              help="Run here even when a resident worker (`loradeploy fleet serve`) answers on the socket.")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def fleet_run_cmd(spec, out, executor, workers, shard, force, in_process, socket_file, as_json):
    """Export every unit of SPEC into OUT and write its index.

    With the local executor the run goes to the resident worker when one answers for this
    toolchain (see `loradeploy fleet serve`): the same units, keys and files, without a new
    process's imports and base load. Exit 0 when every unit passes, 1 when any is outside its
    budget or failed (the others still run), 2 for a bad spec."""
    from .fleet import FleetConfig, run_fleet
    from .render import fleet_progress, print_fleet

    config = FleetConfig(Path(spec), Path(out), executor, workers, shard, force)
    with fleet_progress() as progress:
        resident = None
        if executor == "local" and not in_process:
            from .fleet.server import Refused, run_resident

            try:
                resident = run_resident(config, progress, Path(socket_file) if socket_file else None)
            except Refused as e:
                progress("note", f"{e}; running in this process")
        index = resident[0] if resident else run_fleet(config, progress)
    if resident:
        index["fleet"]["resident_worker"] = {"pid": resident[1]}
    index["fleet"]["out"] = str(Path(out).absolute())
    _emit(index, as_json, print_fleet)
    return 0 if index["passed"] else 1


@fleet_group.command("serve")
@socket_option
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=1800, show_default=True,
              help="End after this many seconds without a run.")
@click.option("--detach", is_flag=True, help="Start in the background and return once it answers.")
def fleet_serve_cmd(socket_file, idle_timeout, detach):
    """Keep a resident fleet worker: one process with PyTorch, transformers and PEFT imported (a
    runtime's own package from its first run on), which later `fleet run`s of this toolchain hand
    their run to. It keeps the bases it loaded and its pool processes between runs, so a re-run
    after one adapter changed costs about that unit alone. One run at a time; others wait. Stop
    it with `loradeploy fleet stop`."""
    from .fleet.server import ResidentWorker, socket_path, start_detached

    path = Path(socket_file) if socket_file else socket_path()
    if detach:
        pid = start_detached(path, idle_timeout)
        click.echo(f"resident fleet worker pid {pid} on {path} (log: {path}.log)")
        return
    ResidentWorker(path, idle_timeout, log=lambda m: click.echo(f"[{time.strftime('%H:%M:%S')}] {m}", err=True)).serve()


@fleet_group.command("stop")
@socket_option
def fleet_stop_cmd(socket_file):
    """Stop the resident fleet worker (after the run it is busy with). Exit 1 when none answers."""
    from .fleet.server import socket_path, stop

    path = Path(socket_file) if socket_file else socket_path()
    pid = stop(path)
    if pid is None:
        click.echo(f"no resident fleet worker answers on {path}", err=True)
        return 1
    click.echo(f"stopped the resident fleet worker pid {pid}")
    return 0


@fleet_group.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Merged fleet output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def fleet_merge_cmd(shards, out, as_json):
    """Merge the outputs of `fleet run --shard I/N` (all N, one spec) into one fleet output with
    one index. Exit 1 when any unit failed, 2 when the shards do not make one whole run."""
    from .fleet import merge_shards
    from .render import print_fleet

    index = merge_shards([Path(s) for s in shards], Path(out))
    index["fleet"]["out"] = str(Path(out).absolute())
    _emit(index, as_json, print_fleet)
    return 0 if index["passed"] else 1


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_cmd(as_json):
    """List the target profiles (built-in and from LORADEPLOY_TARGETS folders)."""
    from .manifest import profile_dict
    from .render import print_targets
    from .profile import load_profile, profile_paths

    profiles = [profile_dict(load_profile(str(p))) for p in profile_paths().values()]
    if as_json:
        click.echo(json.dumps(profiles, indent=2))
    else:
        print_targets(profiles)


def _emit(record: dict, as_json: bool, printer) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        printer(record)


#: exit codes: 0 ok, 1 a measure outside its budget / a regression / a failing file,
#: 2 bad input (LoradeployError), 3 an internal error (a bug), 130 interrupted
INTERNAL_ERROR = 3
DEBUG_HINT = f"{DEBUG_ENV}=1 shows the traceback"


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    name = next((a for a in args if not a.startswith("-")), "")
    return f"loradeploy {name}".strip() if name in cli.commands else "loradeploy"


def main(argv: list[str] | None = None) -> int:
    """Entry point: known errors print one line and exit 2; an unexpected exception (a bug) prints
    one line naming the command and exits 3, so CI can tell a crash from a regression (exit 1).
    ``LORADEPLOY_DEBUG=1`` re-raises both with their traceback."""
    quiet_third_party_logs()
    try:
        code = cli.main(args=argv, prog_name="loradeploy", standalone_mode=False)
    except LoradeployError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(f"error: {e}", err=True)  # the input's fault: a traceback would not help, so no hint
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except Exception as e:  # a bug: one line, its own exit code  # noqa: BLE001
        if os.environ.get(DEBUG_ENV):
            raise
        detail = " ".join(str(e).split())[:300] or "no message"
        click.echo(f"error: internal error in `{_command(argv)}`: {type(e).__name__}: {detail} — this is a bug in "
                   f"loradeploy, not a problem with the input ({DEBUG_HINT}; please report it)", err=True)
        return INTERNAL_ERROR
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
