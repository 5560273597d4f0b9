"""One plugin folder per runtime: the runtime names appear, and the runtime packages are imported,
only in the runtime's own folder ``loradeploy/plugins/<rt>/`` and in the registry's table; every
registered spec is consistent; the one table of measures agrees with the profile budgets."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from loradeploy import measures, registry
from loradeploy.errors import LoradeployError
from loradeploy.profile import Budgets

PACKAGE = Path(__file__).resolve().parents[1] / "loradeploy"
#: a runtime named as a string, or its Python module imported
NAMED = re.compile(r"""["'](onnxruntime|llama\.cpp|bitsandbytes|llama-cpp-python|llama_cpp)["']"""
                   r"|^\s*(import|from)\s+(onnxruntime|llama_cpp|bitsandbytes)\b", re.M)
PLUGIN_FILES = re.compile(r"^plugins/[a-z_]+/[a-z_]+\.py$")
#: the runtimes' own Python packages: imported inside their plugin folder only
RUNTIME_PACKAGES = ("onnx", "onnxruntime", "onnxruntime_genai", "gguf", "llama_cpp", "bitsandbytes", "executorch")


def runtime_package_imports(source: str) -> list[tuple[int, str]]:
    """(line, package) of every import statement of a runtime package (function-local too)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        found += [(node.lineno, n) for n in names if n.split(".")[0] in RUNTIME_PACKAGES]
    return found


def test_no_module_outside_a_plugin_folder_imports_a_runtime_package():
    offenders = [f"{path.relative_to(PACKAGE).as_posix()}:{line}: imports {name}"
                 for path in sorted(PACKAGE.rglob("*.py")) if not PLUGIN_FILES.match(path.relative_to(PACKAGE).as_posix())
                 for line, name in runtime_package_imports(path.read_text())]
    assert offenders == [], "runtime packages are imported in their plugin folder only:\n" + "\n".join(offenders)


def test_the_import_rule_sees_function_local_and_dotted_imports():
    source = "import numpy\ndef f():\n    import onnxruntime as ort\n    from gguf.quants import quantize\n" \
             "from .onnx import x\nimport onnx_tool\n"
    assert runtime_package_imports(source) == [(3, "onnxruntime"), (4, "gguf.quants")]


def test_no_module_outside_the_plugins_and_the_table_names_a_runtime():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if PLUGIN_FILES.match(rel) or rel == "registry.py":
            continue
        for m in NAMED.finditer(path.read_text()):
            line = path.read_text()[:m.start()].count("\n") + 1
            offenders.append(f"{rel}:{line}: {m.group(0).strip()}")
    assert offenders == []


def test_the_grep_finds_a_runtime_named_elsewhere(tmp_path):
    """The pattern above is not vacuous: it catches what it is meant to."""
    assert NAMED.search('if runtime == "bitsandbytes":') and NAMED.search("import onnxruntime as ort\n")
    assert not NAMED.search("the onnxruntime docs say")  # prose is fine


@pytest.mark.parametrize("name", registry.names())
def test_every_spec_loads_and_is_consistent(name):
    spec = registry.get(name)
    assert spec.name == name
    session = spec.session_class()
    assert session.runtime == name
    assert callable(session.reference_unit)
    folder = registry.PLUGINS[name]
    assert type(spec.target_plugin()).__module__.startswith(folder + ".") and session.__module__.startswith(folder + ".")
    assert spec.storage.ladder[0] in spec.storage.accepted and spec.precisions


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(LoradeployError, match="not supported"):
        registry.get("tensorrt")


def test_every_budget_field_bounds_a_measure_of_the_table():
    budget_fields = {f.name for f in fields(Budgets)} - {"latency_p95_ms", "artifact_mb_max"}
    bounded = {m.budget for m in measures.MEASURES.values() if m.budget}
    assert budget_fields == bounded
    for m in measures.MEASURES.values():
        if m.budget:  # a lower bound for higher-is-better measures, an upper bound otherwise
            assert m.budget.endswith("_min" if m.higher_is_better else "_max") or m.budget == "cosine_min"


def test_plan_search_measures_are_in_the_table():
    from loradeploy.quant.search import DEFAULT_BUDGETS, MEASURES

    assert set(MEASURES.values()) == set(DEFAULT_BUDGETS) and all(m in measures.MEASURES for m in DEFAULT_BUDGETS)
