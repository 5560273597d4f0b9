"""A fleet's index in the forms its readers take: the adapter × target table as HTML (links to
each unit's report) and JUnit XML with one test case per unit (CI test-report widgets)."""

from __future__ import annotations

import html as htmllib
from xml.sax.saxutils import escape, quoteattr


def key_measures(validation) -> dict:
    """Each budgeted measure of the unit's adapter (the unit's one adapter, or the merged
    model), and the artifact's size in MB."""
    if validation is None:
        return {}
    return {c["measure"]: c["value"] for c in validation.checks if c.get("budget") is not None
            and " (" not in c["adapter"]}


def grid(index: dict) -> tuple[list[str], list[tuple[str, list[dict | None]]]]:
    """The adapter × target table: the targets, and per adapter its unit under each (or None)."""
    units = index["units"]
    targets = sorted({u["target"] for u in units})
    cell = {(u["adapter"], u["target"]): u for u in units}
    return targets, [(a, [cell.get((a, t)) for t in targets]) for a in sorted({u["adapter"] for u in units})]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def junit(index: dict) -> str:
    """One ``testcase`` per unit (classname = target, name = adapter): a failure lists the
    measures outside their budgets, an error carries the unit's message."""
    units = index["units"]
    s = index["summary"]
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuites name="loradeploy fleet" tests="{len(units)}" failures="{s["fail"]}" errors="{s["error"]}">',
             f'  <testsuite name="loradeploy fleet" tests="{len(units)}" failures="{s["fail"]}" errors="{s["error"]}" '
             f'time="{index["fleet"].get("wall_seconds") or 0}">']
    for u in units:
        lines.append(f'    <testcase classname={quoteattr(u["target"])} name={quoteattr(u["adapter"])} '
                     f'time="{u.get("seconds") or 0}">')
        if u["status"] == "fail":
            failed = "; ".join(u.get("failed") or [])
            lines.append(f'      <failure message={quoteattr("outside budget: " + failed)}>{escape(failed)}</failure>')
        elif u["status"] == "error":
            msg = u.get("message") or "error"
            lines.append(f'      <error message={quoteattr(msg[:500])}>{escape(msg)}</error>')
        state = "ran" if u["ran"] else "up to date (key unchanged), not run again"
        lines.append(f'      <system-out>{escape(state + "; key " + u["key"])}</system-out>')
        lines.append("    </testcase>")
    lines += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(lines)


_STYLE = """body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f4f4f4}
.pass{background:#e6f4ea}.fail{background:#fce8e6}.error{background:#fff3cd}small{color:#555}"""


def html(index: dict) -> str:
    """The adapter × target table: status, key measures, bytes, a link to each report."""
    targets, rows = grid(index)
    f, s = index["fleet"], index["summary"]
    esc = htmllib.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>loradeploy fleet</title>",
           f"<style>{_STYLE}</style></head><body><h1>loradeploy fleet</h1>",
           f"<p>{s['units']} units: {s['pass']} pass, {s['fail']} fail, {s['error']} error; {s['ran']} ran, "
           f"{s['up_to_date']} up to date. Spec {esc(f['spec'])} (sha256 {f['spec_sha256'][:12]}…), executor "
           f"{esc(str(f.get('executor')))}, {f.get('wall_seconds')} s, loradeploy {esc(f['loradeploy_version'])}"
           + (f", shard {esc(f['shard'])}" if f.get("shard") else "") + ".</p>",
           "<table><tr><th>adapter</th>" + "".join(f"<th>{esc(t)}</th>" for t in targets) + "</tr>"]
    for a, units in rows:
        row = [f"<tr><th>{esc(a)}</th>"]
        for u in units:
            if u is None:
                row.append("<td></td>")
                continue
            body = f"<b>{u['status'].upper()}</b>"
            if u.get("report"):
                body = f"<a href='{esc(u['report'])}'>{body}</a>"
            if u.get("bytes") is not None:
                body += f" <small>{u['bytes'] / 2**20:.1f} MB</small>"
            if not u["ran"]:
                body += " <small>(up to date)</small>"
            details = [f"{esc(k)} {_fmt(v)}" for k, v in (u.get("measures") or {}).items()]
            if u.get("failed"):
                details.append("outside budget: " + esc(", ".join(u["failed"])))
            if u.get("message"):
                details.append(esc(u["message"]))
            body += "<br><small>" + "<br>".join(details) + "</small>"
            row.append(f"<td class='{u['status']}'>{body}</td>")
        out.append("".join(row) + "</tr>")
    out += ["</table></body></html>", ""]
    return "\n".join(out)
