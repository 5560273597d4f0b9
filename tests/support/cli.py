"""What a bad input must look like from the outside: exit 2, exactly one line on stderr that
starts with ``error:`` and names the problem, no traceback (the project's bad-input rule)."""

from __future__ import annotations

import re

_PROGRESS_LINE = re.compile(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d+s\] ")


def error_text(err: str) -> str:
    """stderr without the timestamped progress lines a command prints when stderr is not a
    terminal (loradeploy.render.progress_steps): what is left is the error, if any."""
    return "\n".join(line for line in err.strip().splitlines() if not _PROGRESS_LINE.match(line))


def assert_bad_input(code: int, err: str, *needles: str, out: str = "") -> str:
    """Assert a command's exit ``code`` is 2 and its stderr ``err`` (progress lines aside) is
    exactly one ``error: `` line holding every one of ``needles``, and that neither ``err`` nor
    its stdout ``out`` shows a traceback. Returns the error line."""
    lines = error_text(err).splitlines()
    assert code == 2, f"exit {code}, expected 2 (bad input); stderr:\n{err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one `error: ` line on stderr, got {lines}"
    assert "Traceback" not in err + out, f"a traceback was printed:\n{(err + out)[-2000:]}"
    missing = [n for n in needles if n not in lines[0]]
    assert not missing, f"the error line does not name {missing}: {lines[0]}"
    return lines[0]


def main_bad_input(capsys, argv: list[str], *needles: str) -> str:
    """``loradeploy.cli.main(argv)`` in this process, held to :func:`assert_bad_input` (what it
    printed before is discarded). Returns the error line."""
    from loradeploy.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return assert_bad_input(code, captured.err, *needles, out=captured.out)
