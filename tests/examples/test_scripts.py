"""Every script under examples/ run as a user runs it: ``python examples/<script>.py`` in a
subprocess, on real files, its output read back. A renamed or removed name the scripts use
breaks these tests, not a user. (examples/demo.py runs in CI as `make demo`; examples/ci/check.sh
runs in tests/test_check.py; the CI samples and fleet.yaml are in test_ci_samples.py.)

The trainers run for a few steps only (``--train-limit`` on MiniLM; the Gemma ones on a tiny
Gemma-shaped model through ``--base``); the checkers then rebuild the adapters from the files
those runs wrote and must reproduce what the trainers reported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

EXAMPLES = REPO / "examples"
#: MiniLM's six adapted linears per layer: (in, out) features
MINILM_LINEARS = {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
                  "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
                  "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
MINILM_MODULES = {f"bert.encoder.layer.{n}.{p}": shape for n in range(6) for p, shape in MINILM_LINEARS.items()}
QUICK_TEXTS = 64  # two steps of 32; and as many eval texts
#: the four attention projections of the tiny Gemma (hidden 64, 4 query heads and 2 KV heads of 16)
TINY_PROJ = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}


def run(script, *args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """``python <script> <args>`` with this checkout first on the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    """The stdout of a run that must have exited 0 (else its output, to see why)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summary_of(out: str) -> dict:
    """The JSON summary check_examples.py prints before its verdict."""
    start, end = out.index("\n{\n"), out.rindex("\n}\n")
    return json.loads(out[start:end + 2])


# --- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, shipped", [("make_sentiment.py", "sentiment"), ("make_gemma_text.py", "gemma_text")])
def test_data_generator_rewrites_the_shipped_data_byte_for_byte(script, shipped, tmp_path):
    out = ok(run(EXAMPLES / "data" / script, "--out", tmp_path / shipped))
    assert f"{tmp_path / shipped}" in out
    made, kept = files(tmp_path / shipped), files(EXAMPLES / "data" / shipped)
    assert sorted(made) == sorted(kept)
    assert [name for name in made if made[name] != kept[name]] == []


# --- MiniLM: trainers and check_examples.py -------------------------------------------------------

@pytest.mark.slow
def test_check_examples_reproduces_the_shipped_adapters_accuracies():
    out = ok(run(EXAMPLES / "check_examples.py"))
    assert out.rstrip().endswith("ALL OK")
    summary = summary_of(out)
    assert sorted(summary) == ["blora", "increlora", "sora"]
    for name, rec in summary.items():
        log = json.loads((EXAMPLES / "adapters" / name / "train_log.json").read_text())
        assert rec["match"] is True and rec["accuracy"] == pytest.approx(log["eval_accuracy"], abs=1e-9)
        assert rec["accuracy"] >= 0.95 > rec["accuracy_head_only"]  # the adapter, not the head, does it
        assert rec["ranks_live"] < rec["ranks_before"]  # every method left some ranks at exactly zero
        assert re.search(rf"=== {name}:.*?eval accuracy from saved files \(merged dW\) {rec['accuracy']:.4f}.*?"
                         rf"trainer reported {log['eval_accuracy']:.4f}.*?-> MATCH", out, re.S)
    assert summary["blora"]["accuracy_quantized"] == pytest.approx(
        json.loads((EXAMPLES / "adapters" / "blora" / "train_log.json").read_text())["eval_accuracy_quantized"])


@pytest.fixture(scope="module")
def quick_minilm(tmp_path_factory):
    """train(name) → (folder, stdout): the MiniLM trainer for ``name`` run for one epoch on
    QUICK_TEXTS training texts, evaluated on QUICK_TEXTS eval texts, into one folder (laid out
    as examples/adapters, for check_examples.py)."""
    root = tmp_path_factory.mktemp("quick-minilm")
    extra = {"sora": [], "blora": [],
             # allocate at step 1 with a budget that it fills: the reserves are retired at once
             "increlora": ["--warmup-steps", 1, "--delta-t", 1, "--top-k", 9, "--budget", 36 + 9]}
    done = {}

    def train(name):
        if name not in done:
            done[name] = ok(run(EXAMPLES / f"train_{name}.py", "--out", root / name, "--epochs", 1,
                                "--train-limit", QUICK_TEXTS, "--eval-limit", QUICK_TEXTS, *extra[name]))
        return root / name, done[name]

    return train


def read_quick(folder: Path, method: str):
    """The adapter a quick run wrote, as loradeploy reads it: detected as ``method``, a
    sequence classifier with two labels, MiniLM's 36 linears with their shapes."""
    from loradeploy.adapters import read_adapter
    from loradeploy.ir import Method, Task

    adapters = read_adapter(folder)
    assert adapters.method is Method(method)
    assert adapters.task is Task.SEQUENCE_CLASSIFICATION and adapters.num_labels == 2
    assert sorted(adapters.modules) == sorted(MINILM_MODULES)
    for name, m in adapters.modules.items():
        (in_f, out_f), r = MINILM_MODULES[name], m.lora_A.shape[0]
        assert tuple(m.lora_A.shape) == (r, in_f) and tuple(m.lora_B.shape) == (out_f, r), name
    log = json.loads((folder / "train_log.json").read_text())
    assert log["steps"] == QUICK_TEXTS // 32 and log["hyper_parameters"]["train_texts"] == QUICK_TEXTS
    assert log["eval_texts"] == QUICK_TEXTS
    return adapters, log


@pytest.mark.slow
def test_train_sora_quick_run(quick_minilm):
    folder, out = quick_minilm("sora")
    assert f"saved to {folder}" in out and "epoch 1: loss" in out
    adapters, log = read_quick(folder, "sora")
    assert {m.lora_A.shape[0] for m in adapters.modules.values()} == {8}
    assert all(m.gate is not None and m.gate.numel() == 8 for m in adapters.modules.values())
    live = sum(int((m.gate != 0).sum()) for m in adapters.modules.values())
    assert live == log["ranks_live"]


@pytest.mark.slow
def test_train_increlora_quick_run(quick_minilm):
    folder, out = quick_minilm("increlora")
    assert "step 1: budget 45 reached, reserve E set to 0.0" in out
    adapters, log = read_quick(folder, "increlora")
    [allocation] = log["allocations"]
    grown = set(allocation["modules"])
    assert allocation["step"] == 1 and len(grown) == 9
    # r0 = 1 plus a reserve everywhere; the 9 chosen modules turned their reserve into a rank and got a new one
    ranks = {name: m.lora_A.shape[0] for name, m in adapters.modules.items()}
    assert ranks == {name: 3 if name in grown else 2 for name in MINILM_MODULES}
    assert all(float(m.gate[-1]) == 0.0 for m in adapters.modules.values())  # retired reserves


@pytest.mark.slow
def test_train_blora_quick_run(quick_minilm):
    folder, out = quick_minilm("blora")
    assert "eval accuracy (test-time gates, float)" in out
    adapters, log = read_quick(folder, "blora")
    assert {m.lora_A.shape[0] for m in adapters.modules.values()} == {8}
    assert sum(int(m.rank_mask.sum()) for m in adapters.modules.values()) == log["ranks_effective"]


@pytest.mark.slow
def test_check_examples_reproduces_the_quick_runs_and_fails_on_a_number_that_does_not(quick_minilm, tmp_path):
    """What the trainers saved is what they evaluated: check_examples.py rebuilds each adapter
    from the files alone and gets the accuracy each trainer reported; one reported number that
    the files do not give (B-LoRA's quantized accuracy, edited) fails the check."""
    import shutil

    root = tmp_path / "adapters"
    logs = {}
    for name in ("sora", "increlora", "blora"):
        shutil.copytree(quick_minilm(name)[0], root / name)
        logs[name] = json.loads((root / name / "train_log.json").read_text())
    edited = {**logs["blora"], "eval_accuracy_quantized": 1.5 - logs["blora"]["eval_accuracy_quantized"]}
    (root / "blora" / "train_log.json").write_text(json.dumps(edited))
    proc = run(EXAMPLES / "check_examples.py", "--adapters", root)
    assert proc.returncode == 1 and proc.stdout.rstrip().endswith("CHECK FAILED"), proc.stdout[-3000:] + proc.stderr
    summary = summary_of(proc.stdout)
    for name, log in logs.items():
        assert summary[name]["match"] is True, name
        assert summary[name]["accuracy"] == pytest.approx(log["eval_accuracy"], abs=1e-9)
    assert summary["blora"]["accuracy_quantized"] == pytest.approx(logs["blora"]["eval_accuracy_quantized"], abs=1e-9)
    assert re.search(r"with learned quantization from saved files .* -> MISMATCH", proc.stdout)
    assert proc.stdout.count("-> MATCH") == 3


# --- Gemma: trainers and check_gemma_examples.py on a tiny Gemma ------------------------------------
# (the real Gemma 3 270M costs 60-110 s to load here; the tiny one, tests/targets/tiny_lm.py, has
# Gemma's module names and both of its layers are adapted)
GEMMA_STEPS = 12
GEMMA_RUNS = {"sora": ["--lr", 3e-2],
              # allocations at steps 2, 4, 6 and 8 fill a budget of 8 + 4 x 2 ranks: the reserves retire
              "increlora": ["--lr", 3e-2, "--warmup-steps", 2, "--delta-t", 2, "--top-k", 2, "--budget", 16]}


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    from tests.support.tiny_lm import build

    return build(tmp_path_factory.mktemp("tiny-gemma"), "gemma3")


@pytest.fixture(scope="module")
def quick_gemma(tiny_gemma, tmp_path_factory):
    """train(name) → (folder, stdout): the Gemma trainer for ``name`` (sora, increlora) on the
    tiny Gemma into ``<root>/<name>-gemma`` (the layout check_gemma_examples.py reads)."""
    root = tmp_path_factory.mktemp("quick-gemma")
    done = {}

    def train(name):
        if name not in done:
            done[name] = ok(run(EXAMPLES / f"train_{name}_gemma.py", "--base", tiny_gemma, "--out",
                                root / f"{name}-gemma", "--steps", GEMMA_STEPS, "--log-every", 4, *GEMMA_RUNS[name]))
        return root / f"{name}-gemma", done[name]

    return train


def read_gemma(folder: Path, method: str):
    from loradeploy.adapters import read_adapter
    from loradeploy.ir import Method, Task

    adapters = read_adapter(folder)
    assert adapters.method is Method(method) and adapters.task is Task.CAUSAL_LM
    expect = {f"model.layers.{n}.self_attn.{p}": shape for n in range(2) for p, shape in TINY_PROJ.items()}
    assert sorted(adapters.modules) == sorted(expect)
    for name, m in adapters.modules.items():
        (in_f, out_f), r = expect[name], m.lora_A.shape[0]
        assert tuple(m.lora_A.shape) == (r, in_f) and tuple(m.lora_B.shape) == (out_f, r), name
    log = json.loads((folder / "train_log.json").read_text())
    assert log["steps"] == GEMMA_STEPS and log["hyper_parameters"]["layers"] == [0, 1]
    return adapters, log


def test_train_sora_gemma_quick_run_on_a_tiny_gemma(quick_gemma, tiny_gemma):
    folder, out = quick_gemma("sora")
    assert f"loaded {tiny_gemma}" in out and f"step {GEMMA_STEPS}: loss" in out
    adapters, log = read_gemma(folder, "sora")
    assert log["base_model"] == str(tiny_gemma) and log["base_gguf"] is None
    assert {m.lora_A.shape[0] for m in adapters.modules.values()} == {8}
    assert sum(int((m.gate != 0).sum()) for m in adapters.modules.values()) == log["ranks_live"]
    # the adapter moved the model: its perplexity on the text it was trained on went down
    ppl = log["perplexity"]["positive_eval"]
    assert ppl["adapted"] < ppl["base"]


def test_train_increlora_gemma_quick_run_on_a_tiny_gemma(quick_gemma):
    folder, out = quick_gemma("increlora")
    assert "step 8: budget 16 reached, reserve E set to 0.0" in out
    adapters, log = read_gemma(folder, "increlora")
    grown = [m for a in log["allocations"] for m in a["modules"]]
    assert [a["step"] for a in log["allocations"]] == [2, 4, 6, 8] and log["budget_reached_at_step"] == 8
    ranks = {name: m.lora_A.shape[0] for name, m in adapters.modules.items()}
    assert ranks == {name: 2 + grown.count(name) for name in ranks}  # r0 + reserve + one per allocation
    assert all(float(m.gate[-1]) == 0.0 for m in adapters.modules.values())  # retired reserves
    ppl = log["perplexity"]["negative_eval"]
    assert ppl["adapted"] < ppl["base"]


PPL_LINE = re.compile(r"^  perplexity (base|adapted) (positive|negative) +([\d.]+)  train_log +([\d.]+)  "
                      r"rel diff \S+  (OK|MISMATCH)$", re.M)
ORDER_LINE = re.compile(r"^  positive/negative perplexity ratio: SoRA ([\d.]+) < base ([\d.]+) < "
                        r"IncreLoRA ([\d.]+): (OK|NOT AS EXPECTED)$", re.M)


def test_check_gemma_examples_reproduces_the_quick_runs(quick_gemma, tiny_gemma):
    """check_gemma_examples.py rebuilds both adapters on the same tiny base from their files
    alone and gets the perplexities the trainers logged. Its last gate, SoRA (positive reviews)
    and IncreLoRA (negative reviews) moving the positive/negative perplexity ratio in opposite
    directions, is a property of a trained LM, not of a random tiny one: here the test holds the
    verdict and the exit code to the ratios the script prints."""
    root = quick_gemma("sora")[0].parent
    quick_gemma("increlora")
    proc = run(EXAMPLES / "check_gemma_examples.py", "--adapters", root, "--base", tiny_gemma)
    out = proc.stdout
    assert proc.stderr.strip() == "" or "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(re.findall(r"^  folder total .* OK$", out, re.M)) == 2
    ppl = PPL_LINE.findall(out)
    assert len(ppl) == 2 * 4
    blocks = out.split("=== sora-gemma: merged")[1].split("=== increlora-gemma: merged")
    for name, block in zip(("sora", "increlora"), blocks):
        log = json.loads((root / f"{name}-gemma" / "train_log.json").read_text())["perplexity"]
        for which, label, got, want, verdict in PPL_LINE.findall(block):
            assert float(want) == pytest.approx(log[f"{label}_eval"][which], abs=1e-4)
            assert float(got) == pytest.approx(float(want), rel=1e-3) and verdict == "OK"
    sora, base, increlora, order = ORDER_LINE.search(out).groups()
    kl = float(re.search(r"KL\(SoRA \|\| IncreLoRA\) ([\d.]+)", out).group(1))
    assert (order == "OK") == (float(sora) < float(base) < float(increlora) and kl > 0.01)
    # every other line is OK (asserted above), so the order line alone decides the exit code
    assert proc.returncode == (0 if order == "OK" else 1), proc.stderr[-3000:]
    assert out.rstrip().endswith("ALL OK" if order == "OK" else "CHECK FAILED")
    assert "greedy continuations" in out


# --- README ---------------------------------------------------------------------------------------

def readme_python_api() -> str:
    """The ```python block under the README's `## Python API` heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_runs_from_the_repository_layout(tmp_path):
    """The snippet as a user runs it from the repository root; here from a folder that sees the
    repository's examples/, so what it writes stays in the test's folder."""
    from loradeploy.adapters import read_adapter

    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    (tmp_path / "snippet.py").write_text(readme_python_api())
    before = sorted(p.name for p in REPO.iterdir())
    ok(run(tmp_path / "snippet.py", cwd=tmp_path))
    assert sorted(p.name for p in REPO.iterdir()) == before
    outputs = [p for p in tmp_path.rglob("adapter_config.json") if "examples" not in p.parts]
    assert outputs, "the snippet wrote no adapter folder"
    shipped = read_adapter(EXAMPLES / "adapters" / "sora")
    for folder in (p.parent for p in outputs):
        pruned = read_adapter(folder)
        assert set(pruned.modules) <= set(shipped.modules)
        assert sum(m.lora_A.shape[0] for m in pruned.modules.values()) < \
            sum(m.lora_A.shape[0] for m in shipped.modules.values())
