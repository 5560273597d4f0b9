"""The README's "two commands" and what CI runs cannot drift apart: `.ci/run` runs exactly
the README's `make` commands, in the README's order."""

import re

from tests.support.paths import REPO

HEADING = "## Two commands on a fresh machine"


def readme_commands(text: str) -> list[str]:
    """The commands of the first fenced block under :data:`HEADING`, comments stripped."""
    section = text.split(HEADING, 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [c for c in commands if c]


def ci_make_commands(script: str) -> list[str]:
    """The `make …` lines `.ci/run` executes (comments and shell set-up left out)."""
    lines = [line.split("#", 1)[0].strip() for line in script.splitlines()]
    return [line for line in lines if re.match(r"make\b", line)]


def test_ci_runs_the_readme_commands_in_order():
    readme = readme_commands((REPO / "README.md").read_text())
    assert readme == ["make demo", "make test"]
    assert ci_make_commands((REPO / ".ci" / "run").read_text()) == readme


def test_the_parsers_see_a_disagreement():
    readme = readme_commands(f"{HEADING}\n\n```bash\nmake test   # tests\nmake demo  # demo\n```\n")
    ci = ci_make_commands("#!/bin/sh\n# make demo\nset -e\nmake test\n")
    assert readme == ["make test", "make demo"] and ci == ["make test"] and ci != readme


def test_a_hanging_test_fails_under_the_projects_pytest_settings(tmp_path):
    """pytest-timeout is active with the project's settings: a test that hangs fails (here with
    the timeout lowered to 2 s), it does not stall CI."""
    import subprocess
    import sys
    import tomllib

    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < settings["timeout"] <= 1200
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(120)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"),
                           "--rootdir", str(tmp_path), "-o", "timeout=2", str(tmp_path / "test_hang.py")],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1 and "Timeout" in proc.stdout, proc.stdout[-2000:]
