"""``report.html``: the manifest as a page — validation table, latency distributions per
shape, fidelity per class, ranks kept per module. Plots are inline SVG (no plotting library)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .manifest import REPORT
from .slots import natural_key

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child,td:nth-child(2){text-align:left}
.PASS{color:#070}.FAIL{color:#b00;font-weight:bold}.INFO{color:#666}svg{background:#fafafa;margin:4px}
code{background:#f4f4f4;padding:1px 4px}"""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    cls = f' class="{text}"' if text in ("PASS", "FAIL", "INFO") else ""
    return f"<td{cls}>{html.escape(text)}</td>"


def histogram_svg(samples: list[float], title: str, bins: int = 20, w: int = 320, h: int = 140) -> str:
    if not samples:
        return ""
    lo, hi = min(samples), max(samples)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for s in samples:
        counts[min(int((s - lo) / width), bins - 1)] += 1
    top = max(counts)
    bw = (w - 20) / bins
    bars = "".join(
        f'<rect x="{10 + i * bw:.1f}" y="{h - 25 - (c / top) * (h - 45):.1f}" width="{bw - 1:.1f}" '
        f'height="{(c / top) * (h - 45):.1f}" fill="#4a7"/>' for i, c in enumerate(counts))
    label = f'<text x="10" y="14">{html.escape(title)}</text><text x="10" y="{h - 8}">{lo:.1f} ms</text>' \
            f'<text x="{w - 70}" y="{h - 8}">{hi:.1f} ms</text>'
    return f'<svg width="{w}" height="{h}" font-size="11">{bars}{label}</svg>'


def bars_svg(values: dict[str, float], title: str, w: int = 520, bar_h: int = 14) -> str:
    if not values:
        return ""
    top = max(abs(v) for v in values.values()) or 1.0
    h = 24 + bar_h * len(values)
    rows = []
    for i, (k, v) in enumerate(values.items()):
        y = 20 + i * bar_h
        rows.append(f'<text x="4" y="{y + 10}">{html.escape(k[-48:])}</text>'
                    f'<rect x="300" y="{y}" width="{(abs(v) / top) * (w - 360):.1f}" height="{bar_h - 3}" fill="#47a"/>'
                    f'<text x="{w - 55}" y="{y + 10}">{v:.3g}</text>')
    return f'<svg width="{w}" height="{h}" font-size="10"><text x="4" y="12">{html.escape(title)}</text>{"".join(rows)}</svg>'


def scatter_svg(points: list[tuple[float, float, str, str]], title: str, xlabel: str, ylabel: str,
                w: int = 520, h: int = 260) -> str:
    """(x, y, colour, label) points on linear axes; labelled points get their label beside them."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = 0.0, max(ys) or 1.0
    sx = lambda x: 50 + (x - x0) / ((x1 - x0) or 1.0) * (w - 80)  # noqa: E731
    sy = lambda y: h - 35 - (y - y0) / ((y1 - y0) or 1.0) * (h - 60)  # noqa: E731
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{5 if label else 3}" fill="{c}"/>'
                   + (f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 4:.1f}">{html.escape(label)}</text>' if label else "")
                   for x, y, c, label in points)
    axes = (f'<line x1="50" y1="{h - 35}" x2="{w - 20}" y2="{h - 35}" stroke="#999"/>'
            f'<line x1="50" y1="20" x2="50" y2="{h - 35}" stroke="#999"/>'
            f'<text x="4" y="12">{html.escape(title)}</text>'
            f'<text x="50" y="{h - 8}">{html.escape(xlabel)}: {x0:,.0f} … {x1:,.0f}</text>'
            f'<text x="{w - 150}" y="12">{html.escape(ylabel)}: 0 … {y1:.3g}</text>')
    return f'<svg width="{w}" height="{h}" font-size="10">{axes}{dots}</svg>'


def plan_svg(adapter: dict, runtime_metrics: dict | None) -> str:
    """Bytes vs fidelity of the plans the search checked end to end, each uniform plan (every
    tensor at one level), PEFT's convert_to_lora at several thresholds (when measured), the start plan (B-LoRA's bit hints), the chosen plan in PyTorch and
    the same plan measured in the runtime."""
    plan = adapter.get("plan") or {}
    measure = (plan.get("budget") or {}).get("measure")
    if not plan.get("checked_plans") or not measure:
        return ""
    points = [(c["bytes"], c[measure], "#9ab", "") for c in plan["checked_plans"]]
    for u in plan.get("uniform_plans") or []:  # the baselines: every tensor at one level
        if measure in u:
            points.append((u["bytes"], u[measure], "#2a2", u["plan"]))
    for p in plan.get("peft_conversion") or []:  # PEFT's SVD re-factoring by energy threshold
        if measure in p:
            points.append((p["bytes"], p[measure], "#a3c", f"PEFT {p['threshold']}"))
    if plan.get("start_plan"):
        points.append((plan["start_plan"]["bytes"], plan["start_plan"][measure], "#c80", "B-LoRA bits"))
    points.append((plan["bytes"], plan["measured_pytorch"][measure], "#47a", "chosen (PyTorch)"))
    if runtime_metrics and measure in runtime_metrics:
        label = "chosen (runtime, eval set)"
        if "kl_excess_vs_base" in runtime_metrics:  # the runtime's own gap on the base is in it
            label += f"; base alone {runtime_metrics[measure] - runtime_metrics['kl_excess_vs_base']:.3g}"
        points.append((plan["bytes"], runtime_metrics[measure], "#b00", label))
    return scatter_svg(points, f"{adapter['name']}: adapter bytes vs {measure} (budget {plan['budget'].get('max')})",
                       "bytes", measure)


def _glossary(checks: list[dict]) -> str:
    """What each measure of the table means."""
    from .measures import describe

    names = []
    for c in checks:
        base = re.sub(r"\[.*\]$", "", c["measure"])
        if base not in names:
            names.append(base)
    items = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(describe(n) or 'no description')}</li>"
                    for n in names)
    return f"<details open><summary>What the measures mean</summary><ul>{items}</ul></details>"


def _decisions_prose(manifest: dict) -> str:
    """The decisions a person needs to read the page: the mode and why, the slots, the plan."""
    d = manifest.get("decisions", {})
    out = []
    mode = manifest["mode"]
    selection = d.get("mode_selection")
    if selection:
        lines = []
        for cand, r in selection["candidates"].items():
            if not r.get("exportable", True):
                lines.append(f"<li><b>{cand}</b>: not possible in this runtime — {html.escape(r.get('reason', ''))}</li>")
                continue
            failed = [f"{c['measure']} {c['value']:.4g} (budget {c['direction']} {c['budget']:g})"
                      for c in r.get("checks", []) if c.get("status") == "FAIL"]
            verdict = "passes the fidelity budget" if r["passed"] else "misses the fidelity budget: " + ", ".join(failed)
            lines.append(f"<li><b>{cand}</b>: {html.escape(verdict)}</li>")
        out.append(f"<p>Mode <b>auto</b> exported and validated each mode; rule: {html.escape(selection['rule'])}. "
                   f"Shipped: <b>{html.escape(selection['chosen'])}</b>.</p><ul>{''.join(lines)}</ul>"
                   "<p>Rows of the validation table marked <i>not shipped</i> are the other mode's results, shown "
                   "for comparison (INFO).</p>")
    elif mode == "merged":
        out.append("<p>Mode <b>merged</b>: the adapter's ΔW is folded into the base weights; the artifact runs "
                   "with no adapter machinery.</p>")
    else:
        out.append("<p>Mode <b>swappable</b>: the base is exported once and every adapter is a separate file "
                   "activated per call.</p>")
    if "lora_slots" in d:
        out.append(f"<p>LoRA slots: {d['lora_slots']} modules take LoRA inputs (<code>--slots "
                   f"{html.escape(str(d.get('lora_slots_spec', 'blocks')))}</code>); any adapter for this base whose "
                   "modules are among them loads into this artifact.</p>" + _slot_table(d.get("lora_slot_modules")))
    if "norm_inputs" in d:
        out.append(f"<p>Normalization inputs: {d['norm_inputs']} normalization weights and biases (LayerNorm, "
                   "RMSNorm) are overridable inputs defaulting to the base's, so an adapter that trained them loads too"
                   + ("" if d["norm_inputs"] else " (none here: an adapter carrying norms is refused)") + ".</p>")
    if d.get("plan") or any(a.get("plan") for a in manifest["adapters"]):
        out.append("<p>A precision plan chose the storage format of each adapter tensor (see Adapters).</p>")
    return "".join(out)


def _slot_table(slots: dict | None) -> str:
    """The slot modules (in and out features), folded: a count until opened."""
    if not slots:
        return ""
    rows = [[m, *shape] for m, shape in sorted(slots.items(), key=lambda kv: natural_key(kv[0]))]
    return (f"<details><summary>the {len(rows)} slot modules (in, out features)</summary>"
            f"{_table(['module', 'in', 'out'], rows)}</details>")


def _raw_decisions(decisions: dict) -> str:
    """Every decision as JSON, folded; the summary counts the keys and the entries of the long ones."""
    long = [f"{k} {len(v)}" for k, v in decisions.items() if isinstance(v, (dict, list)) and len(v) > 8]
    summary = f"{len(decisions)} keys as recorded in manifest.json" + (f" (entries: {', '.join(long)})" if long else "")
    return (f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(json.dumps(decisions, indent=1))}"
            "</pre></details>")


def render(manifest: dict) -> str:
    v = manifest.get("validation", {})
    parts = [f"<h1>loradeploy artifact: {html.escape(manifest['target']['name'])} ({manifest['mode']})</h1>",
             f"<p>base <code>{html.escape(manifest['base']['spec'])}</code>, task {manifest['task']}, "
             f"{len(manifest['adapters'])} adapter(s), eval set <code>{html.escape(str(v.get('eval_file')))}</code> "
             f"({v.get('eval_inputs')} inputs). Result: <b class=\"{'PASS' if v.get('passed') else 'FAIL'}\">"
             f"{html.escape(v.get('verdict') or ('PASS' if v.get('passed') else 'FAIL'))}</b></p>", "<h2>Validation</h2>"]
    if v.get("eval_note"):
        parts.insert(2, f"<p><b>Note:</b> {html.escape(v['eval_note'])}.</p>")
    parts.append("<p>Each row compares the artifact, run in its runtime, with the fp32 PyTorch reference (the base "
                 "with the adapter as trained, before pruning and quantization). PASS/FAIL rows have a budget from "
                 "the target profile; INFO rows are reported, not budgeted.</p>")
    parts.append(_table(["adapter", "measure", "value", "budget", "status"],
                        [[c["adapter"], c["measure"], c["value"], "" if c["budget"] is None else f"{c['direction']} {c['budget']}",
                          c["status"]] for c in v.get("checks", [])]))
    parts.append(_glossary(v.get("checks", [])))
    parts.append("<h2>How this artifact was made</h2>" + _decisions_prose(manifest))
    parts.append("<h2>Latency</h2>")
    for label, stats in v.get("latency", {}).get("shapes", {}).items():
        parts.append(histogram_svg(stats["samples_ms"], f"{label}: p50 {stats['p50_ms']:.1f} ms, p95 {stats['p95_ms']:.1f} ms"))
    per_class = {name: m["max_abs_logit_per_class"] for name, m in v.get("metrics", {}).items()
                 if "max_abs_logit_per_class" in m}
    if per_class:
        parts.append("<h2>Fidelity per class</h2>")
        for name, values in per_class.items():
            parts.append(bars_svg({f"class {i}": x for i, x in enumerate(values)}, f"{name}: max |Δlogit| per class"))
    parts.append("<h2>Adapters</h2>")
    for a in manifest["adapters"]:
        parts.append(f"<h3>{html.escape(a['name'])} ({a['method']}): rank {a['rank_total'][0]} → {a['rank_total'][1]}, "
                     f"LoRA bytes {a['lora_bytes'][0]:,} → {a['lora_bytes'][1]:,}</h3>")
        ranks = sorted(a["ranks"].items(), key=lambda kv: natural_key(kv[0]))
        parts.append(bars_svg({k: r[1] for k, r in ranks}, "ranks kept per module after exact pruning (0: the method zeroed the whole module)"))
        if a.get("plan"):
            p = a["plan"]
            parts.append(f"<p>precision plan ({html.escape(p['method'])}): {p['bytes']:,} bytes "
                         f"({p['bytes'] / p['bytes_dense_fp16_max_rank']:.1%} of the dense fp16 adapter at its "
                         f"trained rank), formats {html.escape(json.dumps(p['format_counts']))}</p>")
            if p.get("held_out"):
                parts.append(f"<p>{html.escape(held_out_sentence(p))}</p>")
            parts.append(plan_svg(a, v.get("metrics", {}).get(a["name"])))
    parts.append("<h2>Files</h2>")
    parts.append(_table(["file", "bytes", "sha256"], [[f["path"], f"{f['bytes']:,}", f["sha256"][:16] + "…"]
                                                      for f in manifest["files"]]))
    parts.append("<h2>Decisions (raw)</h2>" + _raw_decisions(manifest.get("decisions", {})))
    parts.append("<h2>Environment</h2><pre>" + html.escape(json.dumps(manifest.get("environment", {}), indent=1)) + "</pre>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>loradeploy report</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"


def held_out_sentence(plan: dict) -> str:
    """How the plan did on the held-out texts the search checks it on, in words."""
    h, budget = plan["held_out"], plan.get("budget") or {}
    measure = budget.get("measure")
    got = h["measured"].get(measure) if measure else None
    text = f"On {h['texts']} held-out texts (not among those the plan was fitted to)"
    if got is None:
        return text + " the plan was measured; see the raw decisions."
    text += f" the plan measures {measure} {got:.4g}"
    if budget.get("max") is not None:
        text += f" (it must stay within {h['slack']} × the budget {budget['max']:g} there)"
    elif budget.get("max_bytes") is not None:
        text += (f"; of the plans within {budget['max_bytes']:,} bytes it has the least {measure} there (they were "
                 "compared there, not on the calibration texts they were fitted to)")
    if h.get("backed_off_from"):
        text += (f"; the search's plan of {h['backed_off_from']:,} bytes did not hold there, so it backed off to "
                 f"{plan['bytes']:,} bytes")
    return text + "."


def write_report(folder: Path, manifest: dict) -> Path:
    path = folder / REPORT
    path.write_text(render(manifest))
    return path
