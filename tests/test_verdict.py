"""The verdict of a validation: a budget outside → FAIL, nothing gated → not a PASS (unless
allowed); every built-in profile gates every task it takes (from the tables), the table of tasks
agrees with what the targets refuse, and tiny-LM exports exit 1 when nothing is gated and when a
budget fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from loradeploy import registry
from loradeploy.check import junit_xml, markdown
from loradeploy.cli import main
from loradeploy.kinds import Task
from loradeploy.profile import load_profile, profile_paths
from loradeploy.verdict import NOTHING_GATED, gated_measures, is_ungated, judge
from tests.support.cli import main_bad_input
from tests.support.paths import REPO
from tests.support.profiles import quick_profile
from tests.support import tiny_lm

LM = Task.CAUSAL_LM.value


def _row(adapter, measure, budget, status):
    return {"adapter": adapter, "measure": measure, "value": 0.5, "budget": budget, "direction": ">=", "status": status}


def test_judge_fail_ungated_allowed_and_pass():
    info = [_row("a", "kl_mean", None, "INFO"), _row("a", "artifact_mb", None, "INFO")]
    passed, text = judge(info, ["a"], LM)
    assert not passed and text.startswith("UNGATED: " + NOTHING_GATED) and "budgets adapter_effect_kept_min, kl_mean_max," in text
    assert is_ungated({"verdict": text}) and not is_ungated({"verdict": "PASS"}) and not is_ungated({})
    passed, text = judge(info, ["a"], LM, "--allow-ungated")
    assert passed and text.startswith("PASS (ungated: ") and "--allow-ungated" in text
    # a latency budget alone does not gate the artifact's outputs
    latency = info + [_row("a", "latency_p95_ms[tg]", 100, "PASS")]
    passed, text = judge(latency, ["a"], LM)
    assert not passed and "no fidelity budget applies to a" in text
    # one adapter gated, the other not: not a PASS either
    passed, text = judge([_row("a", "kl_mean", 0.1, "PASS"), _row("b", "kl_mean", None, "INFO")], ["a", "b"], LM)
    assert not passed and text.startswith("UNGATED: no fidelity budget applies to b — not gated")
    assert judge([_row("a", "kl_mean", 0.1, "PASS")], ["a"], LM) == (True, "PASS")
    passed, text = judge([_row("a", "kl_mean", 0.1, "FAIL"), _row("a", "top1_agreement", 0.9, "PASS")], ["a"], LM)
    assert not passed and text == "FAIL: outside its budget: a kl_mean"


def _pairs() -> list[tuple[str, str, bool]]:
    """(profile, task, whether the profile's runtime takes the task at its precision)."""
    out = []
    for name in sorted(profile_paths()):
        p = load_profile(name)
        takes = registry.get(p.runtime).tasks[p.precision]
        out += [(name, t.value, t.value in takes) for t in Task]
    return out


@pytest.mark.parametrize("name,task", [(n, t) for n, t, ok in _pairs() if ok])
def test_every_builtin_profile_gates_every_task_it_takes(name, task):
    """A measure every validation of ``task`` reports has a budget in the profile; a causal LM
    is held to KL, top-1, perplexity and the adapter's effect, fp32 bases to greedy tokens, and
    prompt/generation latency where the runtime times them."""
    p = load_profile(name)
    budgets = asdict(p.budgets)
    assert gated_measures(budgets, task), f"{name} gates no {task} measure"
    assert not p.allow_ungated
    if task == LM:
        assert {"kl_mean", "top1_agreement", "ppl_ratio", "adapter_effect_kept"} <= set(gated_measures(budgets, task))
        if p.precision == "fp32" and p.plan is None:
            assert budgets["greedy_match_min"] == 1.0
        if p.runtime in ("onnxruntime", "llama.cpp"):  # the sessions that time pp{seq} and tg
            assert {"pp128", "tg"} <= set(budgets["latency_p95_ms"])


def test_every_runtime_declares_the_tasks_of_each_precision():
    for spec in registry.specs():
        assert set(spec.tasks) == set(spec.precisions), spec.name
        assert all(set(t) <= {k.value for k in Task} and t for t in spec.tasks.values()), spec.name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a PEFT adapter, a SoRA adapter with and without its head for MiniLM."""
    from tests.support.synthetic import make_sora

    root = tmp_path_factory.mktemp("verdict")
    base = tiny_lm.build(root / "hf", "llama")
    (root / "eval.txt").write_text("the quick brown fox jumps over the lazy dog\nhello world, a test\n")
    return {"root": root, "lm": (str(base), tiny_lm.peft_adapter(root / "a", base)),
            "sequence-classification": ("minilm", make_sora(root / "cls").path),
            "feature-extraction": ("minilm", make_sora(root / "emb", with_head=False).path)}


def _refused() -> list[tuple[str, str]]:
    """One (profile, task) per runtime, precision and task not taken; a profile without a precision plan
    (a learned plan is searched before the target sees the task: minutes for nothing)."""
    seen, out = set(), []
    for name, task, ok in sorted(_pairs(), key=lambda p: load_profile(p[0]).plan is not None):
        p = load_profile(name)
        if not ok and (p.runtime, p.precision, task) not in seen:
            seen.add((p.runtime, p.precision, task))
            out.append((name, task))
    return out


@pytest.mark.parametrize("name,task", _refused())
def test_a_task_a_profile_does_not_take_is_refused(tiny, tmp_path, capsys, name, task):
    """The table of tasks is what the targets do: a task not listed is refused, exit 2."""
    base, adapter = tiny["lm"] if task == LM else tiny[task]
    out = tmp_path / "o"
    main_bad_input(capsys, ["export", "--base", base, "--adapter", str(adapter), "--target", name, "-o", str(out)])
    assert not out.exists()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The command line in a fresh process (stderr not a terminal: one plain line per stage)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "loradeploy.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=900)


def test_an_ungated_lm_export_validate_and_check_exit_1_unless_allowed(tiny, tmp_path, capsys):
    base, adapter = tiny["lm"]
    ungated = quick_profile(tmp_path, "onnx-cpu", budgets={})
    art = tmp_path / "art"
    args = ["export", "--base", base, "--adapter", f"a={adapter}", "--target", str(ungated), "--eval",
            str(tiny["root"] / "eval.txt"), "--mode", "swappable", "-o", str(art)]
    assert main(args) == 1
    manifest = json.loads((art / "manifest.json").read_text())
    v = manifest["validation"]
    assert not v["passed"] and v["verdict"].startswith("UNGATED: " + NOTHING_GATED)
    assert all(c["status"] == "INFO" for c in v["checks"])  # measured, none budgeted
    again = ["--eval", str(tiny["root"] / "eval.txt")]
    assert main(["validate", str(art), *again]) == 1
    assert "UNGATED: " + NOTHING_GATED in capsys.readouterr().out
    check = ["check", str(art), "--baseline", str(art), *again, "--tolerance", "latency=1000"]  # timing: not here
    assert main(check) == 1
    out = capsys.readouterr().out
    assert "UNGATED: " + NOTHING_GATED in out and "regressed" not in out, out
    assert main([*check, "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["ungated"] and not record["passed"] and not record["regressions"]
    assert 'type="ungated"' in junit_xml(record) and "❌ nothing gated" in markdown(record)
    assert main(["validate", str(art), *again, "--allow-ungated"]) == 0
    code = main([*check, "--allow-ungated"])
    assert code == 0, capsys.readouterr().out
    assert main([*args, "--overwrite", "--allow-ungated"]) == 0
    assert "ungated" in json.loads((art / "manifest.json").read_text())["validation"]["verdict"]
    allowed = quick_profile(tmp_path, "onnx-cpu", budgets={}, allow_ungated=True, filename="allowed.yaml")
    assert main([*args[:6], str(allowed), *args[7:], "--overwrite"]) == 0


def test_an_lm_export_outside_a_budget_exits_1_and_names_each_stage(tiny, tmp_path):
    """The onnx-cpu LM budgets and a perplexity ratio no artifact can meet: exit 1 naming it;
    the reference, fidelity, greedy, base-alone and latency stages each print their line."""
    base, adapter = tiny["lm"]
    budgets = {**asdict(load_profile("onnx-cpu").budgets), "ppl_ratio_max": 0.5}
    budgets = {k: v for k, v in budgets.items() if v is not None and k != "latency_p95_ms"}
    strict = quick_profile(tmp_path, "onnx-cpu", budgets=budgets)
    proc = _cli("export", "--base", base, "--adapter", f"a={adapter}", "--target", str(strict), "--eval",
                str(tiny["root"] / "eval.txt"), "--mode", "swappable", "-o", str(tmp_path / "art"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FAIL: outside its budget: a ppl_ratio" in proc.stdout
    v = json.loads((tmp_path / "art" / "manifest.json").read_text())["validation"]
    assert {c["measure"]: c["status"] for c in v["checks"] if c["adapter"] == "a"}["kl_mean"] == "PASS"
    assert 0.99 < v["metrics"]["a"]["adapter_effect_kept"] <= 1.0  # fp32: the adapter's whole effect
    stages = ["computing the fp32 PyTorch reference of the base alone on 2 eval texts",
              "computing the fp32 PyTorch reference of a on 2 eval texts", "fidelity a: the artifact in onnxruntime",
              "greedy match a: 32 tokens after 4 prompts", "done: fidelity a ", "fidelity base alone: the artifact",
              "measuring latency (pp16, tg) and peak RSS", "done: measured latency (pp16, tg) and peak RSS"]
    lines = proc.stderr.splitlines()
    at = [next((i for i, line in enumerate(lines) if stage in line), None) for stage in stages]
    assert None not in at and at == sorted(at), proc.stderr
