"""Fleet specs: what a spec may say, the units' keys, the shard partition, the index's forms."""

import json
import xml.etree.ElementTree as ET

import pytest

from loradeploy.errors import SpecError
from loradeploy.fleet.index import html, junit
from loradeploy.fleet.spec import load_spec, parse_shard, shard
from tests.support.cli import main_bad_input
from tests.support.fleet import copy_examples, write_spec


@pytest.fixture()
def examples(tmp_path):
    return copy_examples(tmp_path)


BAD_SPECS = {
    "unknown top key": ({"adapters": "A", "targets": ["onnx-cpu"], "workers": 4}, "unknown key 'workers'"),
    "unknown adapter key": ({"adapters": [{"path": "adapters/blora", "rank": 4}], "targets": ["onnx-cpu"]},
                            "unknown key 'rank'"),
    "glob matching nothing": ({"adapters": [{"glob": "adapters/none-*"}], "targets": ["onnx-cpu"]},
                              "glob 'adapters/none-*' matches nothing"),
    "two adapters with one name": ({"adapters": [{"path": "adapters/blora"}, {"path": "adapters/sora", "name": "blora"}],
                                    "targets": ["onnx-cpu"]}, "two adapters are named 'blora'"),
    "unknown target": ({"adapters": "A", "targets": ["onnx-gpu"]}, "onnx-gpu"),
    "two targets with one name": ({"adapters": "A", "targets": ["onnx-cpu", {"target": "onnx-cpu-int8",
                                                                               "name": "onnx-cpu"}]},
                                  "two targets are named 'onnx-cpu'"),
    "bad mode": ({"adapters": "A", "targets": ["onnx-cpu"], "mode": "fused"}, "mode 'fused'"),
    "missing adapter path": ({"adapters": [{"path": "adapters/gone"}], "targets": ["onnx-cpu"]}, "no such file"),
    "bad plan": ({"adapters": "A", "targets": [{"target": "onnx-cpu", "plan": "uniform:3"}]}, "uniform:3"),
    "unknown format": ({"adapters": [{"path": "adapters/blora", "format": "lokr"}], "targets": ["onnx-cpu"]},
                       "format 'lokr' is not one of"),
    "bad lora_r": ({"adapters": [{"path": "adapters/blora", "lora_r": "eight"}], "targets": ["onnx-cpu"]},
                   "lora_r must be a positive integer"),
    "adapter not a mapping": ({"adapters": [["adapters/blora"]], "targets": ["onnx-cpu"]},
                              "expected a path or a mapping, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_exits_2_with_one_line_and_writes_nothing(tmp_path, examples, capsys, case):
    data, expected = BAD_SPECS[case]
    if data["adapters"] == "A":
        data = {**data, "adapters": [examples["blora"]]}
    spec = write_spec(tmp_path, data.pop("adapters"), data.pop("targets"), **data)
    out = tmp_path / "out"
    main_bad_input(capsys, ["fleet", "run", str(spec), "-o", str(out)], expected, str(spec))
    assert not out.exists()


def test_a_mistyped_top_level_mode_is_reported_where_it_is_written(tmp_path, examples, capsys):
    """Not at the first target that takes it as its default (``targets[1]``), and with the
    mode meant; a target's own mode is reported at that target."""
    spec = write_spec(tmp_path, [examples["blora"]], ["onnx-cpu", "onnx-cpu-int8"], mode="swapable")
    err = main_bad_input(capsys, ["fleet", "run", str(spec), "-o", str(tmp_path / "out")])
    assert err == (f"error: {spec}: mode 'swapable' is not one of merged, swappable, auto; "
                   "did you mean 'swappable'?")
    spec = write_spec(tmp_path, [examples["blora"]], ["onnx-cpu", {"target": "onnx-cpu-int8", "mode": "merge"}])
    with pytest.raises(SpecError, match=r"targets\[2\]: mode 'merge' .* did you mean 'merged'\?"):
        load_spec(spec)


def test_bad_yaml_and_bad_shard(tmp_path, examples, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("base: minilm\nadapters: [\n")
    main_bad_input(capsys, ["fleet", "run", str(spec), "-o", str(tmp_path / "o")], "not valid YAML", str(spec))
    good = write_spec(tmp_path, [examples["blora"]], ["onnx-cpu"])
    for text in ("2/2", "1", "a/3", "-1/2"):
        main_bad_input(capsys, ["fleet", "run", str(good), "-o", str(tmp_path / "o"), "--shard", text], "expected I/N")
    assert not (tmp_path / "o").exists()


def test_a_key_changes_with_exactly_its_inputs(tmp_path, examples):
    spec = write_spec(tmp_path, list(examples.values()), ["onnx-cpu", "onnx-cpu-int8"])
    first = {u.id: u.key for u in load_spec(spec).units}
    assert len(set(first.values())) == 6
    assert first == {u.id: u.key for u in load_spec(spec).units}  # deterministic
    weights = tmp_path / "adapters" / "blora" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one tensor
    weights.write_bytes(bytes(data))
    second = {u.id: u.key for u in load_spec(spec).units}
    assert {i for i in first if first[i] != second[i]} == {"onnx-cpu/blora", "onnx-cpu-int8/blora"}
    # a different eval set is a different input of every unit
    from tests.support.fleet import small_eval

    spec = write_spec(tmp_path, list(examples.values()), ["onnx-cpu", "onnx-cpu-int8"],
                      eval=str(small_eval(tmp_path)))
    third = {u.id: u.key for u in load_spec(spec).units}
    assert all(third[i] != second[i] for i in third)


def test_globs_name_adapters_by_folder_and_paths_are_relative_to_the_spec(tmp_path, examples):
    sub = tmp_path / "specs"
    sub.mkdir()
    spec = write_spec(sub, [{"glob": "../adapters/[si]*"}], ["onnx-cpu"])
    units = load_spec(spec).units
    assert [u.adapter for u in units] == ["increlora", "sora"]
    assert all(u.path.startswith(str(tmp_path)) for u in units)


def test_shards_partition_the_units(tmp_path, examples):
    import shutil

    for i in range(9):  # 12 adapters: the examples and copies
        shutil.copytree(tmp_path / "adapters" / "blora", tmp_path / "adapters" / f"copy{i}")
    spec = write_spec(tmp_path, [{"glob": "adapters/*"}], ["onnx-cpu", "onnx-cpu-int8"])
    units = load_spec(spec).units
    assert len(units) == 24
    for n in (1, 2, 3, 5):
        parts = [shard(units, i, n) for i in range(n)]
        ids = [u.id for p in parts for u in p]
        assert sorted(ids) == sorted(u.id for u in units)  # every unit once
        assert len(set(ids)) == len(ids)
    assert 0 < len(shard(units, 0, 2)) < 24
    # adding an adapter moves no other unit to another shard
    shutil.copytree(tmp_path / "adapters" / "blora", tmp_path / "adapters" / "zzz")
    more = load_spec(spec).units
    before = {u.id for u in shard(units, 1, 3)}
    after = {u.id for u in shard(more, 1, 3)}
    assert before == after - {u.id for u in more if u.adapter == "zzz"}
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(SpecError):
        parse_shard("4/4")


def _index(statuses):
    units = []
    for n, status in enumerate(statuses):
        u = {"id": f"onnx-cpu/a{n}", "adapter": f"a{n}", "target": "onnx-cpu", "key": f"{n:064x}", "status": status,
             "ran": n % 2 == 0, "seconds": 1.5}
        if status == "fail":
            u.update(failed=["a1: max_abs_logit"], report="onnx-cpu/a1/report.html", measures={"max_abs_logit": 0.5})
        if status == "error":
            u["message"] = "adapters/a2: not a safetensors file <truncated>"
        units.append(u)
    counts = {s: statuses.count(s) for s in ("pass", "fail", "error")}
    return {"fleet": {"spec": "/x/fleet.yaml", "spec_sha256": "0" * 64, "loradeploy_version": "0", "executor": "local",
                      "wall_seconds": 3.0},
            "summary": {"units": len(units), **counts, "ran": 2, "up_to_date": 1}, "passed": False, "units": units}


def test_junit_has_a_case_per_unit_with_failures_and_errors():
    root = ET.fromstring(junit(_index(["pass", "fail", "error"])))
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["a0", "a1", "a2"]
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    assert "max_abs_logit" in cases[1].find("failure").get("message")
    assert "<truncated>" in cases[2].find("error").text  # escaped, and parsed back
    assert root.get("failures") == "1" and root.get("errors") == "1"


def test_html_table_links_reports_and_escapes():
    page = html(_index(["pass", "fail", "error"]))
    assert "href='onnx-cpu/a1/report.html'" in page
    assert "&lt;truncated&gt;" in page and "<truncated>" not in page
    assert page.count("<tr>") == 4  # header + one row per adapter
    json.dumps(_index(["pass"]))
