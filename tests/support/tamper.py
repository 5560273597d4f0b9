"""Changed artifacts for tests: a byte flipped in one file of a copy of an artifact, then
``verify``, ``check`` and ``validate`` must each fail it with exit 1, naming the file, before
measuring anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loradeploy.cli import main
from tests.support.cli import error_text


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one byte of ``path`` (default: at a third of the file). The file is replaced, never
    written through: an artifact may hard-link a file of the cache (a GGUF base)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3 if offset is None else offset] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


def copy_with_flipped_byte(art: Path, rel: str, folder: Path) -> Path:
    """A copy of ``art`` in ``folder`` with one byte of its file ``rel`` flipped."""
    copy = folder / "changed"
    shutil.copytree(art, copy)
    flip_byte(copy / rel)
    return copy


def assert_every_verb_fails(art: Path, rel: str, baseline: Path, capsys, problem: str = "sha256 differs") -> None:
    """``verify``, ``check`` (against ``baseline``, with JUnit and Markdown) and ``validate`` on
    ``art``: exit 1 each, the file ``rel`` and ``problem`` named, no traceback, nothing measured."""
    assert main(["verify", str(art), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(p["file"] == rel and problem in p["problem"] for p in problems), problems

    reports = art.parent / "reports"
    reports.mkdir(exist_ok=True)
    junit, md = reports / "check.xml", reports / "check.md"
    assert main(["check", str(art), "--baseline", str(baseline), "--junit", str(junit), "--markdown", str(md)]) == 1
    out = capsys.readouterr()
    assert f"FAIL {rel}: " in out.out and problem in out.out and "Traceback" not in out.err, out
    assert "not as exported, nothing measured" in out.out
    assert "measuring" not in out.err and "fidelity" not in out.err, out.err  # failed before measuring
    assert f'name="{rel}"' in junit.read_text() and 'type="changed file"' in junit.read_text()
    assert f"FAIL {rel}: " in md.read_text() and "regression: " + rel in md.read_text()
    assert main(["check", str(art), "--baseline", str(baseline), "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert not record["passed"] and rel in record["regressions"] and record["validation"] is None

    assert main(["validate", str(art)]) == 1
    out = capsys.readouterr()
    lines = error_text(out.err).splitlines()
    assert len(lines) == 1 and f"{art}/{rel}: " in lines[0] and problem in lines[0], out.err
    assert "nothing was measured" in lines[0] and "Traceback" not in out.err and out.out == ""
