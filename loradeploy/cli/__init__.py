"""``loradeploy`` command line: parse, call one library verb, print. The only place that
catches :class:`~loradeploy.errors.LoradeployError`."""

from __future__ import annotations

import os
import sys

import click

from ..errors import LoradeployError
from ..logs import DEBUG_ENV, quiet_third_party_logs
from .commands import cli
from .fleet_commands import fleet_group

cli.add_command(fleet_group)


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
    except click.ClickException as e:  # an option click itself refuses: one line, as any bad input
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
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
