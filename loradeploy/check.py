"""The ``check`` verb, a CI gate: validate an artifact again and compare it with a baseline
manifest (or a baseline artifact's). The verdict depends on what matters, not on the machine:

* fidelity: a measure regresses only when it gets worse by more than the relative tolerance
  *and* more than its noise floor (:func:`loradeploy.measures.noise_floor`, tied to the
  measure's budget or the reference outputs' spread), so float noise of another CPU's kernels
  passes and a lower-precision adapter fails;
* size: the artifact may not grow beyond the tolerance;
* latency: the fastest call over the fastest run of the runtime's own reference unit, compared
  only with a baseline measured under the same fingerprint (CPU model, ISA level, runtime
  version, threads); otherwise shown as INFO with the reason, unless ``strict_latency``.

Results as rows, JUnit XML and a Markdown table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from . import manifest as mf
from . import measures
from .errors import LoradeployError
from .machine import mismatch

DEFAULT_TOLERANCE = {"fidelity": 0.01, "latency": 0.25, "size": 0.01}


@dataclass
class Row:
    kind: str  # fidelity | size | latency | file
    name: str  # e.g. "sora/label_agreement", "artifact_bytes", "latency[b1xs128]/reference", "model.onnx"
    baseline: float | None
    now: float | None
    allowed: str
    status: str  # PASS | FAIL | NEW | GONE | INFO
    note: str = ""

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


def read_baseline(path: Path) -> mf.Manifest:
    path = Path(path)
    if not path.exists():
        raise LoradeployError(f"{path}: no such baseline (a manifest.json or an artifact folder)")
    data = mf.read(path) if path.is_dir() else mf.read_file(path)
    if data.validation is None:
        raise LoradeployError(f"{path}: the baseline manifest holds no validation to compare with")
    return data


def _fidelity_rows(baseline: dict, now: dict, tol: float) -> list[Row]:
    """One row per measure of each adapter in both validations; slack = max(relative, floor)."""
    budgets = (baseline.get("target", {}).get("profile", {}) or {}).get("budgets") or {}
    bval, nval = baseline["validation"], now["validation"]
    base, cur = bval.get("metrics", {}), nval.get("metrics", {})
    rows = []
    for label in sorted(set(base) | set(cur)):
        b, n = base.get(label, {}), cur.get(label, {})
        for name in sorted((set(b) | set(n)) & set(measures.COMPARED)):
            row_name = f"{label}/{name}"
            bv, nv = b.get(name), n.get(name)
            if bv is None or nv is None:
                rows.append(Row("fidelity", row_name, bv, nv, "", "NEW" if bv is None else "GONE"))
                continue
            resolution = b.get("tokens") or bval.get("eval_inputs")
            floor = measures.noise_floor(name, budgets, resolution, b.get("reference_spread"))
            slack = max(tol * abs(bv), floor)
            if measures.get(name).higher_is_better:
                ok, allowed = nv >= bv - slack, f">= {bv - slack:.6g}"
            else:
                ok, allowed = nv <= bv + slack, f"<= {bv + slack:.6g}"
            rows.append(Row("fidelity", row_name, bv, nv, allowed, "PASS" if ok else "FAIL",
                            f"noise floor {floor:.3g}"))
    return rows


def _latency_ratios(validation: dict) -> dict[str, float]:
    """Per shape: the fastest call over the fastest run of the runtime's reference unit."""
    shapes = (validation.get("latency") or {}).get("shapes") or {}
    return {label: s["min_over_reference"] for label, s in shapes.items() if "min_over_reference" in s}


def _describe(fp: dict | None) -> str:
    if not fp:
        return "an unrecorded machine"
    return (f"{fp.get('cpu_model')} ({fp.get('isa')}, {fp.get('cpu_count')} CPUs), {fp.get('runtime')} "
            f"{fp.get('runtime_version')}, {fp.get('threads')} threads")


def _latency_rows(bval: dict, cval: dict, tol: float, strict: bool) -> list[Row]:
    b_lat, c_lat = _latency_ratios(bval), _latency_ratios(cval)
    b_fp, c_fp = (bval.get("latency") or {}).get("fingerprint"), (cval.get("latency") or {}).get("fingerprint")
    differ = mismatch(b_fp, c_fp)
    note = "" if not differ else (f"not compared: the baseline was measured on {_describe(b_fp)}, this run on "
                                  f"{_describe(c_fp)} ({', '.join(differ)} differ); --strict-latency compares anyway")
    rows = []
    for label in sorted(set(b_lat) | set(c_lat)):
        name = f"latency[{label}]/reference"
        if label not in b_lat or label not in c_lat:
            rows.append(Row("latency", name, b_lat.get(label), c_lat.get(label), "",
                            "NEW" if label not in b_lat else "GONE"))
            continue
        limit = b_lat[label] * (1 + tol)
        if differ and not strict:
            rows.append(Row("latency", name, b_lat[label], c_lat[label], f"<= {limit:.4g}", "INFO", note))
            continue
        rows.append(Row("latency", name, b_lat[label], c_lat[label], f"<= {limit:.4g}",
                        "PASS" if c_lat[label] <= limit else "FAIL",
                        "compared although the fingerprints differ (--strict-latency)" if differ else
                        "same machine fingerprint"))
    return rows


def compare(baseline: dict, current: dict, tol: dict[str, float], strict_latency: bool = False) -> list[Row]:
    """Rows comparing the ``validation`` of two manifests (baseline first). ``baseline`` is a
    whole manifest (its profile's budgets set the noise floors); ``current`` needs only its
    ``validation``."""
    bv, cv = baseline["validation"], current["validation"]
    rows = _fidelity_rows(baseline, current, tol["fidelity"])
    b_size, c_size = bv.get("artifact_bytes"), cv.get("artifact_bytes")
    if b_size is not None and c_size is not None:
        limit = b_size * (1 + tol["size"])
        rows.append(Row("size", "artifact_bytes", b_size, c_size, f"<= {limit:,.0f}",
                        "PASS" if c_size <= limit else "FAIL"))
    return rows + _latency_rows(bv, cv, tol["latency"], strict_latency)


@dataclass(frozen=True)
class CheckConfig:
    """The ``check`` verb's inputs."""

    artifact: Path
    baseline: Path  # a manifest.json or an artifact folder
    tolerance: str | None = None  # fidelity=F,latency=L,size=S (relative); None: DEFAULT_TOLERANCE
    eval_path: Path | None = None
    strict_latency: bool = False  # compare latency across machine fingerprints too
    allow_ungated: bool = False  # a validation no budget applies to may pass (loradeploy.verdict)


def check(config: CheckConfig, progress=None) -> dict:
    """Validate ``config.artifact`` again and compare with the baseline; ``passed`` is False on a
    regression, when no budget applies to the validation (unless allowed), or (nothing measured)
    when a file of the artifact is not as exported: a row per such file."""
    from .errors import ArtifactChangedError
    from .validate import ValidateConfig, revalidate
    from .verdict import is_ungated

    tol = parse_tolerance(config.tolerance)
    base = read_baseline(config.baseline)
    current = mf.read(config.artifact)
    if base.task != current.task:
        raise LoradeployError(f"{config.baseline}: the baseline is a {base.task} artifact, {config.artifact} a "
                              f"{current.task} one: nothing to compare")
    try:
        result = revalidate(ValidateConfig(Path(config.artifact), config.eval_path, config.allow_ungated), progress)
    except ArtifactChangedError as e:
        result = {"validation": None}
        rows = [Row("file", p["file"], None, None, "as in the manifest", "FAIL", p["problem"]) for p in e.problems]
    else:
        rows = compare(base.to_dict(), {"validation": result["validation"]}, tol, config.strict_latency)
    if result["validation"] and not any(r.kind == "fidelity" and r.status in ("PASS", "FAIL") for r in rows):
        raise LoradeployError(f"{config.baseline}: no fidelity measure in common with {config.artifact} "
                              "(different adapters?)")
    return {"artifact": str(Path(config.artifact).absolute()), "baseline": str(Path(config.baseline).absolute()),
            "target": current.target.name, "baseline_target": base.target.name,
            "tolerance": tol, "strict_latency": config.strict_latency,
            "rows": [{**asdict(r), "change": r.change} for r in rows],
            "regressions": [r.name for r in rows if r.status == "FAIL"],
            "ungated": bool(result["validation"]) and is_ungated(result["validation"]),
            "validation": result["validation"],
            "passed": all(r.status != "FAIL" for r in rows) and not (result["validation"] and
                                                                     is_ungated(result["validation"]))}


def junit_xml(record: dict) -> str:
    """One testcase per measure; a regression is a failure naming the measure and its numbers;
    a validation no budget applies to is one more failure (``budgets``)."""
    rows, ungated = record["rows"], bool(record.get("ungated"))
    suite = ET.Element("testsuite", name="loradeploy.check", tests=str(len(rows) + ungated),
                       failures=str(sum(r["status"] == "FAIL" for r in rows) + ungated), skipped=str(
                           sum(r["status"] in ("NEW", "GONE", "INFO") for r in rows)))
    if ungated:
        case = ET.SubElement(suite, "testcase", classname=f"{record['target']}.gate", name="budgets")
        ET.SubElement(case, "failure", message=record["validation"]["verdict"], type="ungated")
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname=f"{record['target']}.{r['kind']}", name=r["name"])
        if r["status"] == "FAIL" and r["kind"] == "file":
            ET.SubElement(case, "failure", message=f"{r['name']}: {r['note']}", type="changed file")
        elif r["status"] == "FAIL":
            ET.SubElement(case, "failure", message=f"{r['name']} regressed: {r['now']:.6g} (baseline "
                          f"{r['baseline']:.6g}, allowed {r['allowed']})", type="regression")
        elif r["status"] in ("NEW", "GONE"):
            ET.SubElement(case, "skipped", message=f"{r['name']}: {r['status'].lower()} (not in both manifests)")
        elif r["status"] == "INFO":
            ET.SubElement(case, "skipped", message=f"{r['name']}: {r['note']}")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def markdown(record: dict) -> str:
    verdict = (["❌ nothing gated"] if record.get("ungated") else []) + \
        (["❌ regression: " + ", ".join(record["regressions"])] if record["regressions"] else [])
    head = (f"### loradeploy check: {record['target']} — {'; '.join(verdict) or '✅ no regression'}\n\n"
            "| measure | baseline | now | change | allowed | status |\n|---|---|---|---|---|---|\n")

    def fmt(v):
        return "" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")

    body = "".join(f"| {r['name']} | {fmt(r['baseline'])} | {fmt(r['now'])} | {r['change']} | {r['allowed']} | "
                   f"{'**FAIL**' if r['status'] == 'FAIL' else r['status']} |\n" for r in record["rows"])
    notes = "".join(f"\n{n}\n" for n in info_notes(record))
    return head + body + notes


def info_notes(record: dict) -> list[str]:
    """Why rows were shown as INFO (each reason once), e.g. latency from another machine, and what
    is wrong with each file of the artifact that is not as exported."""
    return [f"FAIL {r['name']}: {r['note']}" for r in record["rows"] if r["kind"] == "file"] + list(
        dict.fromkeys(f"INFO {r['kind']}: {r['note']}" for r in record["rows"] if r["status"] == "INFO"))
