"""Fleet runs on MiniLM with the example adapters (ONNX Runtime, swappable): the shared base
graph, up-to-date units skipped, a failing unit among passing ones, a killed run resumed,
shards merged, and the same index on a local Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from loradeploy.cli import main
from tests.support.cli import main_bad_input
from tests.support.profiles import quick_profile
from tests.support.fleet import alive, copy_examples, descendants, small_eval, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three example adapters × onnx-cpu (quick timing), run once with the process pool."""
    root = tmp_path_factory.mktemp("fleet")
    examples = copy_examples(root)
    profile = quick_profile(root, "onnx-cpu")
    spec = write_spec(root, list(examples.values()), [str(profile)], eval=str(small_eval(root)), mode="swappable")
    out = root / "out"
    code = main(["fleet", "run", str(spec), "-o", str(out), "--workers", "2", "--json"])
    return {"root": root, "spec": spec, "out": out, "code": code, "index": json.loads((out / "index.json").read_text()),
            "profile": profile}


def _files(index):
    return {u["id"]: (u["key"], u["files"]) for u in index["units"]}


def test_every_unit_passes_into_its_own_artifact_on_one_base_file(fleet):
    out, index = fleet["out"], fleet["index"]
    assert fleet["code"] == 0 and index["passed"]
    assert sorted(u["id"] for u in index["units"]) == ["onnx-cpu/blora", "onnx-cpu/increlora", "onnx-cpu/sora"]
    assert index["summary"] == {"units": 3, "pass": 3, "fail": 0, "error": 0, "ran": 3, "up_to_date": 0}
    inodes = {os.stat(out / u["id"] / "model.onnx").st_ino for u in index["units"]}
    shared = list((out / "_shared").glob("onnx-cpu/*/model.onnx"))
    assert len(shared) == 1 and inodes == {os.stat(shared[0]).st_ino}  # one graph, hard-linked
    for u in index["units"]:
        assert u["shared_base"] and (out / u["report"]).is_file()
        assert main(["verify", str(out / u["id"]), "--no-load"]) == 0  # each artifact stands alone
    # the three adapters' tensors differ in shape: each unit timed its own artifact, once
    for u in index["units"]:
        timing = json.loads((out / u["id"] / "manifest.json").read_text())["validation"]["latency"]["timing"]
        assert timing["measured_by"] == u["id"] and "reused_by" not in timing
    assert len(list(shared[0].parent.glob("latency/*.json"))) == 3
    cases = ET.parse(out / "junit.xml").getroot().findall(".//testcase")
    assert sorted(c.get("name") for c in cases) == ["blora", "increlora", "sora"]
    assert "onnx-cpu/sora/report.html" in (out / "index.html").read_text()


def test_a_fleet_artifact_answers_as_a_single_export(fleet, tmp_path):
    """The shared graph differs from a single export's only in the head's default: with the
    adapter active both give the same logits, and the same fidelity measures."""
    from loradeploy import runtime
    from loradeploy.base import load_tokenizer
    from loradeploy.evaldata import load_eval
    from loradeploy.validate import session_outputs

    root = fleet["root"]
    single = tmp_path / "single"
    assert main(["export", "--base", "minilm", "--adapter", f"increlora={root / 'adapters' / 'increlora'}",
                 "--target", str(fleet["profile"]), "--mode", "swappable", "--eval", str(root / "eval.jsonl"),
                 "-o", str(single)]) == 0
    texts = load_eval(root / "eval.jsonl").texts
    outs = []
    for folder in (fleet["out"] / "onnx-cpu" / "increlora", single):
        with runtime.open(folder) as session:
            outs.append(session_outputs(session, "increlora", load_tokenizer(folder), texts))
    assert np.abs(outs[0] - outs[1]).max() < 1e-5
    ours = json.loads((fleet["out"] / "onnx-cpu" / "increlora" / "manifest.json").read_text())["validation"]["metrics"]
    theirs = json.loads((single / "manifest.json").read_text())["validation"]["metrics"]
    for m in ("label_agreement", "accuracy", "adapter_effect_kept"):
        assert ours["increlora"][m] == pytest.approx(theirs["increlora"][m], abs=1e-6)
    with runtime.open(fleet["out"] / "onnx-cpu" / "sora") as session:
        sora = session_outputs(session, "sora", load_tokenizer(single), texts)
    assert np.abs(sora - outs[0]).max() > 1e-2  # the adapters differ, so a mix-up would show


def test_rerun_skips_up_to_date_units_and_redoes_a_changed_one(fleet, tmp_path):
    import shutil

    work = tmp_path / "fleet"
    shutil.copytree(fleet["root"], work, symlinks=True)  # hard links become copies: the copy verifies all the same
    spec = work / "fleet.yaml"
    spec.write_text(spec.read_text().replace(str(fleet["root"]), str(work)))
    out = work / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
              and p.name not in ("index.json", "index.html", "junit.xml") and "_shared" not in p.parts}
    stale = out / "_shared" / "onnx-cpu" / "0123456789abcdef"  # a graph no unit uses any more
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"old")
    used = [p.parent for p in (out / "_shared").glob("onnx-cpu/*/model.onnx") if p.parent != stale]
    assert main(["fleet", "run", str(spec), "-o", str(out), "--json"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["summary"]["ran"] == 0 and index["summary"]["up_to_date"] == 3
    assert not stale.exists() and all(p.is_dir() for p in used) and len(used) == 1
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    # one adapter changes: only its unit runs
    weights = work / "adapters" / "blora" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["fleet", "run", str(spec), "-o", str(out), "--json"]) == 0
    index = json.loads((out / "index.json").read_text())
    ran = {u["id"] for u in index["units"] if u["ran"]}
    assert ran == {"onnx-cpu/blora"}
    assert _files(index)["onnx-cpu/blora"] != _files(fleet["index"])["onnx-cpu/blora"]
    # its tensors kept their shapes on the same graph: the latency timed for the old file is
    # reused, and the manifest says so
    latency = json.loads((out / "onnx-cpu" / "blora" / "manifest.json").read_text())["validation"]["latency"]
    first = json.loads((fleet["out"] / "onnx-cpu" / "blora" / "manifest.json").read_text())["validation"]["latency"]
    assert latency["timing"]["measured_by"] == "onnx-cpu/blora" and latency["timing"]["reused_by"] == "onnx-cpu/blora"
    assert latency["shapes"] == first["shapes"]
    assert _files(index)["onnx-cpu/sora"] == _files(fleet["index"])["onnx-cpu/sora"]
    # an artifact changed on disk is not up to date any more, nor one whose manifest was edited
    (out / "onnx-cpu" / "sora" / "adapters" / "sora.onnx_adapter").write_bytes(b"tampered")
    edited = out / "onnx-cpu" / "increlora" / "manifest.json"
    text = edited.read_text()
    assert '"label_agreement": 1.0' in text
    edited.write_text(text.replace('"label_agreement": 1.0', '"label_agreement": 0.5', 1))
    assert main(["fleet", "run", str(spec), "-o", str(out), "--json"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert {u["id"] for u in index["units"] if u["ran"]} == {"onnx-cpu/sora", "onnx-cpu/increlora"}


def test_a_failing_unit_does_not_stop_the_others(fleet, tmp_path, capsys):
    root = fleet["root"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    (bad / "adapter_config.json").write_text((root / "adapters" / "blora" / "adapter_config.json").read_text())
    spec = write_spec(tmp_path, [{"name": "bad", "path": str(bad)},
                                 {"name": "blora", "path": str(root / "adapters" / "blora")}],
                      [str(fleet["profile"])], eval=str(root / "eval.jsonl"))
    out = tmp_path / "out"
    assert main(["fleet", "run", str(spec), "-o", str(out), "--workers", "1"]) == 1
    index = json.loads((out / "index.json").read_text())
    status = {u["adapter"]: u for u in index["units"]}
    assert status["blora"]["status"] == "pass"
    assert status["bad"]["status"] == "error" and "adapter_model.safetensors" in status["bad"]["message"]
    assert not (out / "onnx-cpu" / "bad").exists()  # nothing half-written
    error = ET.parse(out / "junit.xml").getroot().find(".//testcase[@name='bad']/error")
    assert "adapter_model.safetensors" in error.get("message")
    # a unit outside its budget: exit 1, the unit FAIL with the measure named
    strict = quick_profile(tmp_path, "onnx-cpu", filename="strict.yaml",
                           budgets={"max_abs_logit_max": 1e-12, "label_agreement_min": 1.0})
    spec = write_spec(tmp_path, [{"name": "blora", "path": str(root / "adapters" / "blora")}], [str(strict)],
                      eval=str(root / "eval.jsonl"))
    assert main(["fleet", "run", str(spec), "-o", str(tmp_path / "strict"), "--workers", "1", "--json"]) == 1
    (unit,) = json.loads((tmp_path / "strict" / "index.json").read_text())["units"]
    assert unit["status"] == "fail" and unit["failed"] == ["blora: max_abs_logit"]


def test_a_killed_run_resumes_where_it_stopped(fleet, tmp_path):
    root = fleet["root"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loradeploy.cli", "fleet", "run", str(fleet["spec"]), "-o", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("onnx-cpu/*.unit.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name.split(".")[0] for p in out.glob("onnx-cpu/*.unit.json")}
    assert len(done) == 1, "the first unit finished before the kill"
    assert not (out / "index.json").exists()
    assert main(["fleet", "run", str(fleet["spec"]), "-o", str(out), "--workers", "1", "--json"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert {u["adapter"] for u in index["units"] if not u["ran"]} == done
    assert index["summary"]["ran"] == 2
    assert not list(out.glob("onnx-cpu/.*partial*"))  # the killed unit's temporary folder is gone
    assert _files(index) == _files(fleet["index"])
    del root


def test_shards_merge_into_the_full_run(fleet, tmp_path, capsys):
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"shard{i}")
        assert main(["fleet", "run", str(fleet["spec"]), "-o", str(outs[-1]), "--shard", f"{i}/2", "--workers", "1"]) == 0
    sizes = [json.loads((o / "index.json").read_text())["summary"]["units"] for o in outs]
    assert sum(sizes) == 3 and min(sizes) >= 1
    main_bad_input(capsys, ["fleet", "merge", str(outs[1]), "-o", str(tmp_path / "half")], "shard")  # one is missing
    assert main(["fleet", "merge", *map(str, outs), "-o", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "index.json").read_text())
    assert _files(merged) == _files(fleet["index"])
    for u in merged["units"]:
        assert main(["verify", str(tmp_path / "all" / u["id"]), "--no-load"]) == 0
    # the shared graph came along, as one file with the artifacts', with every shard's timings
    (graph,) = (tmp_path / "all" / "_shared").glob("onnx-cpu/*/model.onnx")
    assert {os.stat(tmp_path / "all" / u["id"] / "model.onnx").st_ino for u in merged["units"]} == \
           {os.stat(graph).st_ino}
    assert len(list(graph.parent.glob("latency/*.json"))) == 3
    # so a run into the merged output finds every unit up to date and keeps the graph
    assert main(["fleet", "run", str(fleet["spec"]), "-o", str(tmp_path / "all"), "--json"]) == 0
    again = json.loads((tmp_path / "all" / "index.json").read_text())
    assert again["summary"]["up_to_date"] == 3 and graph.is_file()


def test_the_same_fleet_on_a_local_ray_cluster(fleet, tmp_path):
    """Ray tasks on a local cluster of 2 CPUs give the same index: same keys, same sha256 per file."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", "fleet", "run", str(fleet["spec"]), "-o", str(out),
                           "--executor", "ray", "--workers", "2", "--json"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert index["fleet"]["executor"] == "ray" and index["summary"]["ran"] == 3
    assert _files(index) == _files(fleet["index"])
    workers = {json.loads((out / "onnx-cpu" / f"{u['adapter']}.unit.json").read_text())["worker"] for u in index["units"]}
    assert all(":" in w for w in workers)


@pytest.mark.parametrize("after", [0.0, 3.0], ids=["while-workers-start", "while-they-export"])
def test_pool_workers_end_with_a_killed_run(fleet, tmp_path, after):
    """A SIGKILLed fleet run leaves no pool worker (nor its latency process) holding a loaded base,
    whether it is killed while they are still starting or while they load the base / export."""
    cmd = [sys.executable, "-m", "loradeploy.cli", "fleet", "run", str(fleet["spec"]), "-o", str(tmp_path / "out"),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers = set()
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        workers = {p for p in descendants(proc.pid) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()}
    assert len(workers) == 2, "the pool started"
    time.sleep(after)
    family = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in family if alive(p)]
