"""README.md and docs/: every relative link points at a file that exists (and an anchor at a
heading of it), every `loradeploy …` command line shown names a real command and only flags that
command has, and the README stays short (≤ 200 lines)."""

import re

import click
import pytest

from loradeploy.cli import cli
from tests.support.paths import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]


def command_lines(page) -> list[str]:
    """`loradeploy …` lines of the fenced blocks, continuation lines (`\\`) joined, comments cut."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if line.startswith("loradeploy ") and not line.startswith("loradeploy."):
                found.append(line)
    return found


def resolve(line: str) -> tuple[click.Command, list[str]]:
    """The click command a line names and the long flags it uses."""
    words = line.split()[1:]
    command = cli
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    assert not isinstance(command, click.Group), f"{line!r}: names no command"
    return command, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(words))


def test_the_readme_is_short_and_links_into_docs():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    assert any(link.startswith("docs/") for link in links(readme))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link to {link}: no such file"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"(?m)^#+ (.+)$", target.read_text())
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: link to {link}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_name_real_commands_and_flags(page):
    for line in command_lines(page):
        command, flags = resolve(line)
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        known |= {"--help"}
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"{page.name}: `{line}`: {command.name} has no {', '.join(unknown)}"


def test_the_checks_can_fail():
    with pytest.raises(AssertionError):
        resolve("loradeploy nosuchcommand --x")
    command, flags = resolve("loradeploy fleet run spec.yaml --no-such-flag -o out")
    assert command.name == "run" and flags == ["--no-such-flag"]
    assert _anchor("CI gate: `verify` and `check`") == "ci-gate-verify-and-check"
