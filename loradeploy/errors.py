"""The one exception family of loradeploy.

Library code raises a subclass of :class:`LoradeployError` with a one-line message that names
the file or value at fault and, where there is one, the fix. Only ``cli.main`` catches them.
"""

from __future__ import annotations


class LoradeployError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class AdapterFileError(LoradeployError):
    """A checkpoint file cannot be read (missing, truncated, corrupt, unsafe pickle)."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class AdapterFormatError(LoradeployError):
    """The file reads, but its tensors do not form a valid adapter of the claimed format."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class BaseModelError(LoradeployError):
    """The base model cannot be resolved or loaded, or does not fit the adapter."""


class OutputError(LoradeployError):
    """The output location cannot be written."""


class ProfileError(LoradeployError):
    """A target profile is missing, unreadable or invalid."""


class IRError(LoradeployError):
    """A module's tensors do not fit together; readers re-raise it naming their file."""


class PlanError(LoradeployError):
    """A plan file is unreadable, or does not fit the adapter or runtime it is used with."""


class EvalDataError(LoradeployError):
    """An eval or calibration set is missing, empty or malformed."""


class ManifestError(LoradeployError):
    """A manifest file is missing, unreadable or not of this version's shape."""


class SpecError(LoradeployError):
    """A fleet spec is unreadable or invalid (unknown keys, a glob matching nothing, two adapters
    with one name, an unknown target)."""


class ArtifactChangedError(LoradeployError):
    """An artifact's files are not those its manifest records (changed, missing, unlisted, or the
    manifest itself edited): a failing artifact, not bad input, so it exits 1 as a failed
    validation does. ``problems``: ``{"file", "problem"}`` per file, as ``verify`` lists them."""

    exit_code = 1

    def __init__(self, artifact, problems: list[dict]):
        first = problems[0]
        more = f" (and {len(problems) - 1} more: `loradeploy verify` lists them)" if len(problems) > 1 else ""
        super().__init__(f"{artifact}/{first['file']}: {first['problem']}; the artifact is not as exported, so "
                         f"nothing was measured{more}")
        self.artifact = artifact
        self.problems = problems


def did_you_mean(value, choices) -> str:
    """``"; did you mean 'X'?"`` naming the one of ``choices`` closest to ``value`` (difflib), or
    ``""`` when none is close (case aside): the tail of a message about an unknown name."""
    import difflib

    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""
