"""The CI workflow samples (examples/ci/*.yml) and the fleet example (examples/fleet.yaml): they
parse, and every command a workflow step runs exists and parses as that step runs it, for every
value of the job's matrix: `make` targets (`make -n`), `bash` scripts (`bash -n`), `loradeploy`
command lines (through the CLI's own click parser, and the values it checks only at run time,
such as `--shard`), and the torch a step installs is the one the set-up pins.
(examples/ci/check.sh itself runs in tests/test_check.py.)"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.paths import REPO

EXAMPLES = REPO / "examples"
WORKFLOWS = sorted((EXAMPLES / "ci").glob("*.yml"))
OPERATORS = {"&&", "||", ";", "|"}


def parse_cli(args: list[str]) -> tuple[str, dict]:
    """``loradeploy ARGS`` parsed by the CLI's click parser, down to the command it runs, without
    running it: (command path, its parameters). A bad option or value raises click's error."""
    import click

    from loradeploy.cli import cli

    ctx = cli.make_context("loradeploy", list(args))
    while isinstance(ctx.command, click.Group):
        rest = [*(getattr(ctx, "_protected_args", None) or ctx.protected_args), *ctx.args]
        name, command, rest = ctx.command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx.command_path, ctx.params


def expand(script: str, matrix: dict) -> list[str]:
    """``script`` once per combination of the matrix values (${{ matrix.KEY }} substituted)."""
    keys = sorted(matrix)
    out = []
    for values in itertools.product(*(matrix[k] for k in keys)) if keys else [()]:
        text = script
        for k, v in zip(keys, values):
            text = re.sub(r"\$\{\{\s*matrix\.%s\s*\}\}" % re.escape(k), str(v), text)
        assert "${{" not in text, f"an expression this test does not know: {text}"
        out.append(text)
    return out


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: lines joined at a trailing backslash, split at
    &&, ||, ; and |."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in list(lexer) + [";"]:
            if token in OPERATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
    return out


def steps_with_matrix(workflow: dict):
    for job_name, job in workflow["jobs"].items():
        matrix = ((job.get("strategy") or {}).get("matrix")) or {}
        for step in job["steps"]:
            if "run" in step:
                yield job_name, step, matrix


def pinned_torch() -> set[str]:
    """Every ``torch==VERSION`` the set-up names (Makefile, constraint and lock files)."""
    found = set()
    for path in [REPO / "Makefile", *REPO.glob("*.txt"), *REPO.glob("*.lock"), *REPO.glob("*.in")]:
        found.update(re.findall(r"(?<![\w-])torch==([\w.+]+)", path.read_text()))
    return found


def check_command(argv: list[str], matrix_size: dict) -> str:
    """Assert that one command of a workflow step exists and parses; returns what it ran."""
    program = Path(argv[0]).name
    if program == "make":
        proc = subprocess.run(["make", "-n", "-C", str(REPO), *argv[1:]], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    elif program == "bash":
        script = REPO / argv[1]
        assert script.is_file(), f"{argv[1]}: no such script"
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{argv[1]}: {proc.stderr}"
    elif program == "loradeploy":
        path, params = parse_cli(argv[1:])
        for token in argv[1:]:
            if token.startswith("examples/"):
                assert list(REPO.glob(token)), f"{' '.join(argv)}: {token} does not exist"
        if params.get("shard"):
            from loradeploy.fleet.spec import parse_shard

            _, count = parse_shard(params["shard"])
            assert count == matrix_size.get("shard", count), f"--shard {params['shard']} over a matrix of other size"
        return path
    elif program == "pip":
        for version in re.findall(r"^torch==([\w.+]+)$", "\n".join(argv), re.M):
            assert version in pinned_torch(), f"installs torch {version}; the set-up pins {pinned_torch()}"
    elif program != "test":  # `|| test $? -eq 1`: the shell's own
        pytest.fail(f"a command this test does not know how to check: {' '.join(argv)}")
    return program


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_sample_parses_and_every_command_it_runs_exists(path):
    workflow = yaml.safe_load(path.read_text())
    assert workflow["jobs"] and workflow["name"]
    ran = []
    for job_name, step, matrix in steps_with_matrix(workflow):
        sizes = {k: len(v) for k, v in matrix.items()}
        for script in expand(step["run"], matrix):
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{job_name}: {step.get('name')}: {proc.stderr}"
            ran += [check_command(argv, sizes) for argv in commands(script)]
    assert "make" in ran  # every sample sets up as the README says


def test_the_samples_run_the_commands_the_examples_document():
    """github-actions.yml runs examples/ci/check.sh; fleet-matrix.yml shards examples/fleet.yaml
    and merges the shards."""
    runs = {p.name: [step["run"] for _, step, _ in steps_with_matrix(yaml.safe_load(p.read_text()))]
            for p in WORKFLOWS}
    assert "bash examples/ci/check.sh" in runs["github-actions.yml"]
    fleet = [parse_cli(argv[1:]) for script in runs["fleet-matrix.yml"]
             for argv in commands(script.replace("${{ matrix.shard }}", "0")) if argv[0].endswith("loradeploy")]
    assert [(p, params.get("spec")) for p, params in fleet][:1] == [("loradeploy fleet run", "examples/fleet.yaml")]
    assert [p for p, _ in fleet[1:]] == ["loradeploy fleet merge"]


def test_fleet_example_spec_loads_with_every_adapter_and_target():
    from loradeploy.adapters import ReadOptions, read_adapter
    from loradeploy.fleet.spec import load_spec

    spec = load_spec(EXAMPLES / "fleet.yaml")
    assert sorted((u.target_name, u.adapter) for u in spec.units) == sorted(
        itertools.product(["onnx-cpu", "onnx-cpu-int8"], ["blora", "increlora", "sora"]))
    assert len({u.key for u in spec.units}) == 6
    for unit in spec.units:
        adapters = read_adapter(unit.path, options=ReadOptions(head=Path(unit.head) if unit.head else None))
        assert adapters.num_labels == 2, unit.id
    # the command its header comment gives parses
    [line] = [line for line in (EXAMPLES / "fleet.yaml").read_text().splitlines() if "loradeploy fleet" in line]
    assert parse_cli(shlex.split(line.lstrip("# "))[1:])[1]["spec"] == "examples/fleet.yaml"
