"""Fleet specs over the example adapters, written into a test's folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.support.paths import EXAMPLE_ADAPTERS

#: the MiniLM examples; sora's head is a separate file (real SoRA checkpoints hold none)
EXAMPLES = ("sora", "increlora", "blora")


def copy_examples(folder: Path, names=EXAMPLES) -> dict[str, dict]:
    """Copies of the example adapters (so a test may change one) → their spec entries."""
    entries = {}
    for name in names:
        dst = folder / "adapters" / name
        shutil.copytree(EXAMPLE_ADAPTERS / name, dst)
        entry = {"name": name, "path": f"adapters/{name}"}
        if (dst / "head.safetensors").is_file():
            entry["head"] = f"adapters/{name}/head.safetensors"
        entries[name] = entry
    return entries


def write_spec(folder: Path, adapters: list, targets: list, **more) -> Path:
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "base": "minilm", "adapters": adapters, "targets": targets, **more},
                                   sort_keys=False))
    return path


def small_eval(folder: Path, lines: int = 64) -> Path:
    from loradeploy.evaldata import DEFAULT_EVAL

    path = folder / "eval.jsonl"
    path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:lines]) + "\n")
    return path


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), from the parent id field of
    each /proc/<pid>/stat; ``pid`` itself not included."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it ended while we read
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
