"""The public API (loradeploy.__all__, loradeploy.PUBLIC_MODULES) exists, and every import line
that the README, docs/ and examples/ show a user resolves and names only public things: a
renamed or removed name breaks this test, not a user."""

import ast
import importlib
import re
import subprocess
import sys

import pytest

import loradeploy
from tests.support.paths import REPO


def python_sources() -> dict[str, str]:
    """Python code users read: examples/**/*.py, and the ```python blocks of README.md and docs/*.md."""
    sources = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "examples").rglob("*.py"))}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            sources[f"{doc.relative_to(REPO)} block {i + 1}"] = block
    return sources


def loradeploy_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import of loradeploy (name None for `import loradeploy.x`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "loradeploy":
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "loradeploy"]
    return found


SOURCES = python_sources()


def test_there_are_user_imports_to_check():
    assert "examples/demo.py" in SOURCES and any(k.startswith("README.md") for k in SOURCES)
    assert loradeploy_imports(SOURCES["examples/demo.py"])


@pytest.mark.parametrize("where", sorted(SOURCES))
def test_every_import_a_user_sees_resolves_to_a_public_name(where):
    public = {"loradeploy", *loradeploy.PUBLIC_MODULES}
    for module, name in loradeploy_imports(SOURCES[where]):
        mod = importlib.import_module(module)
        if name is None:
            assert module in public, f"{where}: imports {module}, not a public module"
            continue
        assert not name.startswith("_"), f"{where}: imports the private {module}.{name}"
        if hasattr(mod, name) or name in loradeploy.__all__:
            assert module in public, f"{where}: imports {name} from {module}, not a public module"
        else:  # a submodule (from loradeploy.adapters import peft)
            importlib.import_module(f"{module}.{name}")
            assert f"{module}.{name}" in public, f"{where}: imports {module}.{name}, not a public module"


def test_every_public_name_and_module_resolves():
    for name in loradeploy.__all__:
        assert getattr(loradeploy, name) is not None, name
    for module in loradeploy.PUBLIC_MODULES:
        importlib.import_module(module)
    with pytest.raises(AttributeError):
        loradeploy.no_such_name  # noqa: B018


def test_the_checker_catches_a_private_or_missing_name():
    bad = "from loradeploy.cli import _quiet_third_party_logs\nfrom loradeploy import no_such_name\n"
    imports = loradeploy_imports(bad)
    assert imports == [("loradeploy.cli", "_quiet_third_party_logs"), ("loradeploy", "no_such_name")]
    assert not hasattr(importlib.import_module("loradeploy"), "no_such_name")


def test_import_loradeploy_loads_no_torch():
    code = "import sys, loradeploy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_no_public_name_is_shadowed_by_a_submodule():
    """`from loradeploy import export` would give the module once `loradeploy.export` is imported:
    a top-level name must not be a submodule's name, and each resolves to what it says."""
    import pkgutil
    import types

    submodules = {m.name for m in pkgutil.iter_modules(loradeploy.__path__)}
    for module in submodules:
        importlib.import_module(f"loradeploy.{module}")
    assert not submodules & set(loradeploy.__all__)
    for name in loradeploy.__all__:
        assert not isinstance(getattr(loradeploy, name), types.ModuleType), name
