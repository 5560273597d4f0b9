"""``loradeploy`` command line: parse, call one library verb, print. The only place that
catches :class:`~loradeploy.errors.LoradeployError`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import LoradeployError
from .ir import Method

_METHODS = click.Choice([m.value for m in Method])
DEBUG_ENV = "LORADEPLOY_DEBUG"


def _read_options(lora_alpha, lora_r, head):
    from .adapters import ReadOptions

    return ReadOptions(lora_alpha=lora_alpha, lora_r=lora_r, head=Path(head) if head else None)


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


def _prune_config(tolerance):
    from .prune import PruneConfig

    try:
        return PruneConfig(tolerance=tolerance)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tolerance")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loradeploy")
def cli():
    """Ship trained rank-adaptive LoRA adapters (SoRA, IncreLoRA, Bayesian-LoRA, PEFT) to edge
    runtimes: read, prune exactly, quantize, export, validate.

    Set LORADEPLOY_DEBUG=1 to see tracebacks."""


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


def _emit(record: dict, as_json: bool, printer) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        printer(record)


def main(argv: list[str] | None = None) -> int:
    """Entry point: known errors print one line and exit 2; bugs keep their traceback."""
    _quiet_third_party_logs()
    try:
        cli.main(args=argv, prog_name="loradeploy", standalone_mode=False)
    except LoradeployError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


def _quiet_third_party_logs() -> None:
    """Keep stderr for our own messages: bitsandbytes warns on import about optional hub
    kernels it cannot fetch, transformers about heads it initialises."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


if __name__ == "__main__":
    sys.exit(main())
