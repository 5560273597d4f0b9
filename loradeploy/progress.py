"""The progress protocol every long verb takes (a leaf: imports nothing of ours).

A verb takes ``progress: Progress | None``. ``step(message)`` reports a stage that has finished;
a step may also have ``step.begin(message)`` to name the stage that starts now, which
:func:`begin` calls when it exists. The terminal implementation is ``render.progress_steps``;
:func:`quiet` is the step that shows nothing.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str], None]


def quiet(_message: str) -> None:
    """The progress step that shows nothing (a verb called without ``progress``)."""


def steps(progress: Progress | None) -> Progress:
    """``progress`` itself, or :func:`quiet` when there is none."""
    return progress or quiet


def begin(step: Progress, message: str) -> None:
    """Name the stage that starts now, if ``step`` can show it."""
    announce = getattr(step, "begin", None)
    if announce is not None:
        announce(message)
