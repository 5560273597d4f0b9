"""``loradeploy ab`` shows what it served (loradeploy.runtime.ab): every request's arm and answer,
the class by the name the adapter's config gave it (kept in the manifest at export) or by
``--labels``, and per arm the answers per class and the mean latency, all checked against the
outputs the runtime gives for the same inputs and adapters."""

import json
import re

import numpy as np
import pytest

from loradeploy import runtime
from loradeploy.cli import main
from loradeploy.job import AdapterSpec
from loradeploy.manifest import read as read_manifest
from loradeploy.runtime.router import _cuts, assign
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters

N_TEXTS = 12
INCRELORA_NAMES = ["negative", "positive"]  # examples/adapters/increlora/config.json id2label


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """MiniLM on onnxruntime, swappable, with sora (its files name no classes) and increlora
    (its config.json names them), validated on the first texts of the shipped eval set."""
    from loradeploy.evaldata import DEFAULT_EVAL

    folder = tmp_path_factory.mktemp("ab")
    inputs = folder / "inputs.jsonl"
    inputs.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:N_TEXTS]) + "\n")
    export_adapters("minilm", [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ("sora", "increlora")],
                    str(quick_profile(folder, "onnx-cpu")), folder / "art", mode="swappable", eval_path=inputs)
    return folder / "art", inputs


def _expected(art, inputs, arm_adapters: dict[str, str]) -> list[tuple[str, int]]:
    """(arm, label) per request: the arm the documented assignment picks for the request's key
    (its line number) and the top-1 class of that arm's adapter in a session opened here."""
    from loradeploy.evaldata import load_eval

    texts = load_eval(inputs).texts
    arms = list(arm_adapters)
    cuts = _cuts(arms, None)
    with runtime.open(art) as session:
        out = []
        for i, text in enumerate(texts):
            arm = arms[assign(str(i), cuts)]
            out.append((arm, int(session.run(session.encode([text]), arm_adapters[arm]).outputs.argmax())))
    return out


def test_manifest_keeps_the_class_names_the_adapter_config_gives(art):
    manifest = read_manifest(art[0])
    assert manifest.adapter("increlora").labels == INCRELORA_NAMES
    assert manifest.adapter("sora").labels is None  # SoRA's files name no classes (and MiniLM's config neither)


def test_ab_json_has_each_requests_arm_and_named_answer_and_a_summary_per_arm(art, capsys):
    artifact, inputs = art
    code = main(["ab", str(artifact), "--arm", "s=sora", "--arm", "i=increlora", "--inputs", str(inputs), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = _expected(artifact, inputs, {"s": "sora", "i": "increlora"})
    assert {a for a, _ in expected} == {"s", "i"}  # both arms serve: the names below are checked on each
    served = record["served"]
    assert [(r["arm"], r["answer"]["label"]) for r in served] == expected
    assert [r["key"] for r in served] == [str(i) for i in range(N_TEXTS)]
    # increlora's classes by its config's names, sora's by label id
    assert [r["answer"]["name"] for r in served] == [
        INCRELORA_NAMES[label] if arm == "i" else str(label) for arm, label in expected]
    assert record["labels"] == {"s": None, "i": INCRELORA_NAMES}
    assert all(0.5 <= r["answer"]["score"] <= 1 and r["latency_ms"] > 0 for r in served)
    for arm, names in (("s", ["0", "1"]), ("i", INCRELORA_NAMES)):
        mine = [r for r in served if r["arm"] == arm]
        summary = record["arms"][arm]
        assert summary["requests"] == len(mine) == record["router"]["arms"][arm]["requests"]
        assert summary["labels"] == {n: sum(names[lab] == n for a, lab in expected if a == arm) for n in names}
        assert summary["latency_ms_mean"] == pytest.approx(np.mean([r["latency_ms"] for r in mine]))
        assert summary["latency_ms_mean"] == pytest.approx(record["router"]["arms"][arm]["latency_ms"]["mean"])


def test_ab_prints_each_requests_arm_and_label_name(art, capsys):
    artifact, inputs = art
    assert main(["ab", str(artifact), "--arm", "s=sora", "--arm", "i=increlora", "--inputs", str(inputs)]) == 0
    out = capsys.readouterr().out
    expected = _expected(artifact, inputs, {"s": "sora", "i": "increlora"})
    for i, (arm, label) in enumerate(expected):
        name = INCRELORA_NAMES[label] if arm == "i" else str(label)
        row = rf"^\s*{i} │ {i}\s+│ {arm}\s+│ {name} \(\d\.\d\d\)\s+│\s+\d"  # columns: #, key, arm, answer, ms
        assert re.search(row, out, re.M), (i, arm, name, out)
    for arm, names in (("s", ["0", "1"]), ("i", INCRELORA_NAMES)):  # the summary row: answers per class
        answers = ", ".join(f"{n} {sum(names[lab] == n for a, lab in expected if a == arm)}" for n in names)
        assert re.search(rf"^\s*{arm}\s+│.*│ {answers}\s+│", out, re.M), (arm, answers, out)


def test_an_arm_given_as_an_adapter_file_names_its_classes_as_its_manifest_does(art, capsys):
    artifact, inputs = art
    code = main(["ab", str(artifact), "--arm", f"f={artifact / 'adapters' / 'increlora.onnx_adapter'}",
                 "--inputs", str(inputs), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["labels"] == {"f": INCRELORA_NAMES}
    expected = _expected(artifact, inputs, {"f": "increlora"})
    assert [r["answer"]["name"] for r in record["served"]] == [INCRELORA_NAMES[label] for _, label in expected]


def test_labels_option_names_every_arms_classes(art, capsys):
    artifact, inputs = art
    code = main(["ab", str(artifact), "--arm", "s=sora", "--arm", "i=increlora", "--inputs", str(inputs),
                 "--labels", "neg,pos", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = _expected(artifact, inputs, {"s": "sora", "i": "increlora"})
    assert [r["answer"]["name"] for r in record["served"]] == [["neg", "pos"][label] for _, label in expected]
    assert {a: s["labels"] for a, s in record["arms"].items()} == {
        arm: {n: sum(["neg", "pos"][lab] == n for a, lab in expected if a == arm) for n in ("neg", "pos")}
        for arm in ("s", "i")}
    for bad, message in (("neg,pos,neutral", "--labels: 3 names for 2 classes"),
                         ("neg,neg", "distinct comma-separated class names")):
        main_bad_input(capsys, ["ab", str(artifact), "--arm", "s=sora", "--inputs", str(inputs), "--labels", bad], message)
