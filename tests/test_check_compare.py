"""check's comparison on its own (no export): float noise of another machine passes, a real
fidelity regression fails whatever the machine, latency is compared only under a matching
machine fingerprint (or when asked to be strict)."""

import copy
import json

import pytest

from loradeploy import measures
from loradeploy.check import compare, info_notes, junit_xml, markdown, parse_tolerance
from loradeploy.errors import LoradeployError
from loradeploy.machine import isa_level, mismatch
from tests.support.paths import REPO

HERE = {"cpu_model": "AMD EPYC", "isa": "x86-64-v4+avx512_vnni", "cpu_count": 2, "runtime": "onnxruntime",
        "runtime_version": "1.32.0", "threads": 2, "reference": "unit-block-v2"}
THERE = {**HERE, "cpu_model": "Intel Xeon", "isa": "x86-64-v3"}
ONNX_CPU = {"label_agreement_min": 1.0, "max_abs_logit_max": 0.001, "accuracy_drop_max": 0.0, "cosine_min": 0.99999}
LEARNED = {"label_agreement_min": 0.99, "accuracy_drop_max": 0.005, "mean_abs_logit_max": 0.02, "cosine_min": 0.999}


def manifest(metrics: dict, budgets: dict, fingerprint: dict | None, ratio: float = 4.3, size: int = 1000) -> dict:
    latency = {"shapes": {"b1xs128": {"min_over_reference": ratio}}}
    if fingerprint is not None:
        latency["fingerprint"] = fingerprint
    return {"target": {"name": "onnx-cpu", "profile": {"budgets": budgets}},
            "validation": {"eval_inputs": 500, "metrics": {"sora": metrics}, "latency": latency,
                           "artifact_bytes": size}}


def rows_by_name(rows):
    return {r.name: r for r in rows}


FP32 = {"label_agreement": 1.0, "max_abs_logit": 3.338e-06, "mean_abs_logit": 7.5e-07, "accuracy": 1.0,
        "accuracy_drop": 0.0, "adapter_effect_kept": 0.9999996, "reference_spread": 2.9}


def test_float_noise_from_another_machine_passes_and_latency_is_info():
    base = manifest(FP32, ONNX_CPU, THERE, ratio=4.32)
    now = manifest({**FP32, "max_abs_logit": 5.96e-06, "mean_abs_logit": 1.4e-06, "adapter_effect_kept": 0.9999991},
                   ONNX_CPU, HERE, ratio=7.79)
    rows = rows_by_name(compare(base, now, parse_tolerance(None)))
    assert rows["sora/max_abs_logit"].status == "PASS"  # +2.6e-6 < floor 2% of 0.001
    assert rows["sora/mean_abs_logit"].status == "PASS"
    lat = rows["latency[b1xs128]/reference"]
    assert lat.status == "INFO" and "cpu_model" in lat.note and "isa" in lat.note
    assert all(r.status in ("PASS", "INFO") for r in rows.values())


def test_the_same_latency_change_fails_under_a_matching_fingerprint():
    base = manifest(FP32, ONNX_CPU, HERE, ratio=4.32)
    now = manifest(FP32, ONNX_CPU, dict(HERE), ratio=7.79)
    rows = rows_by_name(compare(base, now, parse_tolerance(None)))
    assert rows["latency[b1xs128]/reference"].status == "FAIL"
    ok = rows_by_name(compare(base, manifest(FP32, ONNX_CPU, HERE, ratio=4.9), parse_tolerance(None)))
    assert ok["latency[b1xs128]/reference"].status == "PASS"


def test_strict_latency_compares_across_fingerprints():
    base = manifest(FP32, ONNX_CPU, THERE, ratio=4.32)
    now = manifest(FP32, ONNX_CPU, HERE, ratio=7.79)
    rows = rows_by_name(compare(base, now, parse_tolerance(None), strict_latency=True))
    assert rows["latency[b1xs128]/reference"].status == "FAIL"


def test_a_baseline_without_fingerprint_is_not_compared_for_latency():
    rows = rows_by_name(compare(manifest(FP32, ONNX_CPU, None), manifest(FP32, ONNX_CPU, HERE, ratio=99.0),
                                parse_tolerance(None)))
    assert rows["latency[b1xs128]/reference"].status == "INFO"


def test_int8_to_int4_adapter_regression_fails_on_any_machine():
    # measured (issue 6): sora mean |Δlogit| uniform int8 0.00059, uniform int4 0.0305
    base = manifest({**FP32, "mean_abs_logit": 0.00059, "max_abs_logit": 0.004}, LEARNED, THERE)
    now = manifest({**FP32, "mean_abs_logit": 0.0305, "max_abs_logit": 0.16}, LEARNED, HERE)
    rows = rows_by_name(compare(base, now, parse_tolerance(None)))
    assert rows["sora/mean_abs_logit"].status == "FAIL"
    assert rows["sora/max_abs_logit"].status == "FAIL"  # unbudgeted: floor 0.1% of the spread (0.0029)


def test_fraction_floor_is_one_eval_input():
    one = manifest({**FP32, "accuracy_drop": 0.002, "label_agreement": 0.998}, ONNX_CPU, HERE)
    three = manifest({**FP32, "accuracy_drop": 0.006, "label_agreement": 0.994}, ONNX_CPU, HERE)
    base = manifest(FP32, ONNX_CPU, HERE)
    assert rows_by_name(compare(base, one, parse_tolerance(None)))["sora/accuracy_drop"].status == "PASS"
    bad = rows_by_name(compare(base, three, parse_tolerance(None)))
    assert bad["sora/accuracy_drop"].status == "FAIL"
    assert bad["sora/label_agreement"].status == "PASS"  # 3 of 500 is within the relative 1%


@pytest.mark.parametrize("name,budgets,kw,expected", [
    ("max_abs_logit", {"max_abs_logit_max": 0.001}, {}, 2e-5),
    ("max_abs_logit", {}, {"spread": 3.0}, 3e-3),
    ("mean_abs_logit", {"max_abs_logit_max": 0.001}, {"spread": 3.0}, 2e-5),
    ("max_abs_logit", {}, {}, measures.MIN_FLOOR),
    ("kl_p99", {"kl_mean_max": 0.02}, {}, 4e-4),
    ("kl_excess_vs_base", {"kl_mean_max": 0.02, "kl_excess_vs_base_max": 0.005}, {}, 1e-4),
    ("cosine_min", {"cosine_min": 0.99}, {}, 2e-4),
    ("top1_agreement", {}, {"resolution": 889}, 1 / 889),
])
def test_noise_floor_rule(name, budgets, kw, expected):
    assert measures.noise_floor(name, budgets, **kw) == pytest.approx(expected)


def test_committed_ci_baseline_passes_float_noise_under_a_foreign_fingerprint():
    """examples/ci/baseline/manifest.json against itself moved by last-bit noise on another CPU."""
    base = json.loads((REPO / "examples" / "ci" / "baseline" / "manifest.json").read_text())
    now = copy.deepcopy(base)
    for m in now["validation"]["metrics"].values():
        for key in ("max_abs_logit", "mean_abs_logit"):
            m[key] = m[key] * 1.8 + 1e-6
    now["validation"]["latency"]["fingerprint"] = {**THERE, "runtime_version": "0.0"}
    for shape in now["validation"]["latency"]["shapes"].values():
        shape["min_over_reference"] *= 1.8
    rows = compare(base, now, parse_tolerance("fidelity=0.01,latency=1.0,size=0.01"))
    assert [r.name for r in rows if r.status == "FAIL"] == []
    assert {r.status for r in rows if r.kind == "latency"} == {"INFO"}


def test_reports_say_why_latency_was_not_compared():
    rows = compare(manifest(FP32, ONNX_CPU, THERE), manifest(FP32, ONNX_CPU, HERE), parse_tolerance(None))
    record = {"target": "onnx-cpu", "passed": True, "regressions": [],
              "rows": [{**r.__dict__, "change": r.change} for r in rows]}
    assert "not compared" in markdown(record) and len(info_notes(record)) == 1
    assert 'message="latency[b1xs128]/reference: not compared' in junit_xml(record)


def test_tolerance_parsing_rejects_nonsense():
    with pytest.raises(LoradeployError):
        parse_tolerance("speed=2")
    with pytest.raises(LoradeployError):
        parse_tolerance("latency=-1")
    assert parse_tolerance("latency=1.0")["latency"] == 1.0


def test_fingerprint_fields():
    assert isa_level({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "cx16", "lahf_lm", "popcnt",
                      "sse4_1", "sse4_2", "ssse3"}) == "x86-64-v3"
    assert isa_level({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3", "avx512f"}) == "x86-64-v2"
    assert mismatch(HERE, THERE) == ["cpu_model", "isa"]
    assert mismatch(HERE, None) == ["fingerprint"] and mismatch(HERE, dict(HERE)) == []
    assert mismatch(HERE, {**HERE, "reference": "unit-v1"}) == ["reference"]  # another ratio definition


@pytest.mark.parametrize("passed, notes", [(True, False), (True, True), (False, True)])
def test_the_markdown_ends_with_one_newline(passed, notes):
    """A file others append to or `cat` (a pull-request comment): its last line ends, once."""
    row = {"kind": "latency" if notes else "fidelity", "name": "sora/mean_abs_logit", "baseline": 1e-6,
           "now": 2e-6 if not passed else 1e-6, "change": "+1e-06", "allowed": "+1%",
           "status": "INFO" if notes else ("PASS" if passed else "FAIL"), "note": "another CPU" if notes else ""}
    record = {"target": "onnx-cpu", "passed": passed, "regressions": [] if passed else ["sora/mean_abs_logit"],
              "rows": [row, {**row, "name": "artifact_bytes", "kind": "size", "status": "PASS", "note": ""}]}
    text = markdown(record)
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert text.rstrip("\n").splitlines()[-1] == ("INFO latency: another CPU" if notes else
                                                  "| artifact_bytes | 1e-06 | 1e-06 | +1e-06 | +1% | PASS |")
