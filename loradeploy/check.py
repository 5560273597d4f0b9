"""The ``check`` verb, a CI gate: validate an artifact again and compare it with a baseline
manifest (or a baseline artifact's). Fidelity may not get worse, the artifact may not grow, and
latency — as a ratio to a fixed reference workload timed in the same process — may not grow,
each beyond its tolerance. Results as rows, JUnit XML and a Markdown table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from . import manifest as mf
from .errors import LoradeployError

#: fidelity measures and the direction that is better
HIGHER_BETTER = {"label_agreement", "accuracy", "cosine_min", "cosine_mean", "top1_agreement", "adapter_effect_kept"}
LOWER_BETTER = {"max_abs_logit", "mean_abs_logit", "kl_mean", "kl_p99", "kl_excess_vs_base", "top1_drop_vs_base",
                "accuracy_drop"}
DEFAULT_TOLERANCE = {"fidelity": 0.01, "latency": 0.25, "size": 0.01}
#: absolute slack under the relative fidelity tolerance, so values at ~0 do not fail on noise
FIDELITY_FLOOR = 1e-6


@dataclass
class Row:
    kind: str  # fidelity | size | latency
    name: str  # e.g. "sora/label_agreement", "artifact_bytes", "latency[b1xs128]/reference"
    baseline: float | None
    now: float | None
    allowed: str
    status: str  # PASS | FAIL | NEW | GONE

    @property
    def change(self) -> str:
        if self.baseline is None or self.now is None:
            return ""
        if abs(self.baseline) < 1e-4:  # relative change of a near-zero value says nothing
            return f"{self.now - self.baseline:+.3g}"
        return f"{(self.now - self.baseline) / abs(self.baseline):+.2%}"


def parse_tolerance(text: str | None) -> dict[str, float]:
    tol = dict(DEFAULT_TOLERANCE)
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in tol:
            raise LoradeployError(f"--tolerance {text}: expected fidelity=…,latency=…,size=… (relative, e.g. 0.05)")
        try:
            v = float(value)
        except ValueError:
            raise LoradeployError(f"--tolerance {text}: {value!r} is not a number") from None
        if not (v >= 0 and math.isfinite(v)):
            raise LoradeployError(f"--tolerance {text}: {key} must be a non-negative number")
        tol[key.strip()] = v
    return tol


def read_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LoradeployError(f"{path}: no such baseline (a manifest.json or an artifact folder)")
    data = mf.read(path) if path.is_dir() else mf.read_file(path)
    if not isinstance(data.get("validation"), dict):
        raise LoradeployError(f"{path}: the baseline manifest holds no validation to compare with")
    return data


def _fidelity_rows(base: dict, now: dict, tol: float) -> list[Row]:
    rows = []
    labels = sorted(set(base) | set(now))
    for label in labels:
        b, n = base.get(label, {}), now.get(label, {})
        for measure in sorted((set(b) | set(n)) & (HIGHER_BETTER | LOWER_BETTER)):
            name = f"{label}/{measure}"
            bv, nv = b.get(measure), n.get(measure)
            if bv is None or nv is None:
                rows.append(Row("fidelity", name, bv, nv, "", "NEW" if bv is None else "GONE"))
                continue
            slack = tol * abs(bv) + FIDELITY_FLOOR
            if measure in HIGHER_BETTER:
                ok, allowed = nv >= bv - slack, f">= {bv - slack:.6g}"
            else:
                ok, allowed = nv <= bv + slack, f"<= {bv + slack:.6g}"
            rows.append(Row("fidelity", name, bv, nv, allowed, "PASS" if ok else "FAIL"))
    return rows


def _latency_ratios(validation: dict) -> dict[str, float]:
    """Per shape: the fastest call over the fastest reference unit, interleaved in the latency
    worker, else p50 over the reference timed around the runs."""
    lat = validation.get("latency") or {}
    ref = lat.get("reference_workload_ms")
    out = {}
    for label, s in (lat.get("shapes") or {}).items():
        if "min_over_reference" in s:
            out[label] = s["min_over_reference"]
        elif ref and "p50_ms" in s:
            out[label] = s["p50_ms"] / ref
    return out


def compare(baseline: dict, current: dict, tol: dict[str, float]) -> list[Row]:
    """Rows comparing the ``validation`` of two manifests (baseline first)."""
    bv, cv = baseline["validation"], current["validation"]
    rows = _fidelity_rows(bv.get("metrics", {}), cv.get("metrics", {}), tol["fidelity"])
    b_size, c_size = bv.get("artifact_bytes"), cv.get("artifact_bytes")
    if b_size is not None and c_size is not None:
        limit = b_size * (1 + tol["size"])
        rows.append(Row("size", "artifact_bytes", b_size, c_size, f"<= {limit:,.0f}",
                        "PASS" if c_size <= limit else "FAIL"))
    b_lat, c_lat = _latency_ratios(bv), _latency_ratios(cv)
    for label in sorted(set(b_lat) | set(c_lat)):
        name = f"latency[{label}]/reference"
        if label not in b_lat or label not in c_lat:
            rows.append(Row("latency", name, b_lat.get(label), c_lat.get(label), "", "NEW" if label not in b_lat else "GONE"))
            continue
        limit = b_lat[label] * (1 + tol["latency"])
        rows.append(Row("latency", name, b_lat[label], c_lat[label], f"<= {limit:.4g}",
                        "PASS" if c_lat[label] <= limit else "FAIL"))
    return rows


def check(artifact: Path, baseline: Path, tolerance: str | None = None, eval_path: Path | None = None,
          progress=None) -> dict:
    """Validate ``artifact`` again and compare with ``baseline``; ``passed`` is False on a regression."""
    from .export import revalidate

    tol = parse_tolerance(tolerance)
    base = read_baseline(baseline)
    current = mf.read(artifact)
    if base.get("task") != current.get("task"):
        raise LoradeployError(f"{baseline}: the baseline is a {base.get('task')} artifact, {artifact} a "
                              f"{current.get('task')} one: nothing to compare")
    result = revalidate(Path(artifact), eval_path, progress)
    rows = compare(base, {"validation": result["validation"]}, tol)
    if not any(r.kind == "fidelity" and r.status in ("PASS", "FAIL") for r in rows):
        raise LoradeployError(f"{baseline}: no fidelity measure in common with {artifact} (different adapters?)")
    return {"artifact": str(Path(artifact).absolute()), "baseline": str(Path(baseline).absolute()),
            "target": current["target"]["name"], "baseline_target": base.get("target", {}).get("name"),
            "tolerance": tol, "rows": [{**asdict(r), "change": r.change} for r in rows],
            "regressions": [r.name for r in rows if r.status == "FAIL"],
            "passed": all(r.status != "FAIL" for r in rows), "validation": result["validation"]}


def junit_xml(record: dict) -> str:
    """One testcase per measure; a regression is a failure naming the measure and its numbers."""
    rows = record["rows"]
    suite = ET.Element("testsuite", name="loradeploy.check", tests=str(len(rows)),
                       failures=str(sum(r["status"] == "FAIL" for r in rows)), skipped=str(
                           sum(r["status"] in ("NEW", "GONE") for r in rows)))
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname=f"{record['target']}.{r['kind']}", name=r["name"])
        if r["status"] == "FAIL":
            ET.SubElement(case, "failure", message=f"{r['name']} regressed: {r['now']:.6g} (baseline "
                          f"{r['baseline']:.6g}, allowed {r['allowed']})", type="regression")
        elif r["status"] in ("NEW", "GONE"):
            ET.SubElement(case, "skipped", message=f"{r['name']}: {r['status'].lower()} (not in both manifests)")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def markdown(record: dict) -> str:
    head = (f"### loradeploy check: {record['target']} — "
            f"{'✅ no regression' if record['passed'] else '❌ regression: ' + ', '.join(record['regressions'])}\n\n"
            "| measure | baseline | now | change | allowed | status |\n|---|---|---|---|---|---|\n")

    def fmt(v):
        return "" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")

    body = "".join(f"| {r['name']} | {fmt(r['baseline'])} | {fmt(r['now'])} | {r['change']} | {r['allowed']} | "
                   f"{'**FAIL**' if r['status'] == 'FAIL' else r['status']} |\n" for r in record["rows"])
    return head + body
