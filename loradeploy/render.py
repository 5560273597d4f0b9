"""Human-readable output of the CLI (rich tables); ``--json`` bypasses this module."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
if not console.is_terminal:  # pipes and CI logs: do not squeeze tables into 80 columns
    console.width = 160


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _bits(bits: dict) -> str:
    return " ".join(f"{k.removeprefix('lora_')}:{v}" for k, v in bits.items()) or "-"


def print_inspect(record: dict) -> None:
    t = record["totals"]
    console.print(f"[bold]{record['sources'][0]['path']}[/bold]")
    console.print(f"format: {record['method']}   task: {record['task']}"
                  + (f" ({record['num_labels']} labels)" if record["num_labels"] else "")
                  + (f" [dim](from {escape(record['task_from'])})[/]" if record.get("task_from") else ""))
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "out×in", "scale", "rank", "bytes", "bits"):
        table.add_column(col, justify="left" if col in ("module", "bits") else "right",
                         no_wrap=col != "module", overflow="fold")
    for m in record["modules"]:
        rank = f"{m['rank_before']} → {m['rank_after']}"
        size = f"{human_bytes(m['bytes_before'])} → {human_bytes(m['bytes_after'])}"
        table.add_row(escape(m["name"]), "×".join(map(str, m["shape"])), f"{m['scale']:.4g}", rank, size,
                      _bits(m["bits"]))
    console.print(table)
    console.print(
        f"modules {t['modules_before']} → {t['modules_after']}, rank {t['rank_before']} → "
        f"{t['rank_after']}, LoRA bytes {human_bytes(t['bytes_before'])} → "
        f"{human_bytes(t['bytes_after'])}, params {t['params_before']:,}"
        + (f", extra tensors {human_bytes(t['extra_bytes'])}" if t["extra_bytes"] else "")
    )
    for note in record["notes"]:
        console.print(f"note: {note}")


def print_prune(record: dict) -> None:
    t = record["totals"]
    out = record["output"]
    console.print(
        f"{record['method']}: rank {t['rank_before']} → {t['rank_after']}, modules "
        f"{t['modules_before']} → {t['modules_after']}, LoRA bytes {human_bytes(t['bytes_before'])} → "
        f"{human_bytes(t['bytes_after'])}; ΔW {'unchanged' if t['exact'] else 'changed (tolerance)'}"
    )
    console.print(f"wrote {out['folder']}: {', '.join(out['files'])}")
    for note in record["notes"]:
        console.print(f"note: {note}")


def print_summary_table(rows: list[dict]) -> None:
    """The demo's one-line-per-adapter table."""
    table = Table(title="inspect + prune", show_edge=False)
    for col in ("adapter", "format", "modules", "rank", "LoRA bytes", "saved", "ΔW exact"):
        table.add_column(col, justify="left" if col in ("adapter", "format") else "right")
    for r in rows:
        t = r["totals"]
        saved = 1 - t["bytes_after"] / t["bytes_before"] if t["bytes_before"] else 0
        table.add_row(r["name"], r["method"], f"{t['modules_before']} → {t['modules_after']}",
                      f"{t['rank_before']} → {t['rank_after']}",
                      f"{human_bytes(t['bytes_before'])} → {human_bytes(t['bytes_after'])}",
                      f"{saved:.0%}", "yes" if t["exact"] else "NO")
    console.print(table)


def print_validation(record: dict) -> None:
    """The PASS/FAIL table of a validation (from ``export`` or ``validate``)."""
    v = record["validation"]
    table = Table(title=f"validation: {record.get('target', '')} ({record.get('mode', '')}), "
                        f"{v['eval_inputs']} eval inputs", show_edge=False)
    for col in ("adapter", "measure", "value", "budget", "status"):
        table.add_column(col, justify="left" if col in ("adapter", "measure") else "right")
    colors = {"PASS": "green", "FAIL": "bold red", "INFO": "dim"}
    for c in v["checks"]:
        budget = "" if c["budget"] is None else f"{c['direction']} {c['budget']:g}"
        table.add_row(escape(c["adapter"]), escape(c["measure"]), f"{c['value']:.4g}", budget,
                      f"[{colors[c['status']]}]{c['status']}[/]")
    console.print(table)
    console.print(f"eval set: {escape(str(v['eval_file']))} ({v['eval_inputs']} inputs)")
    if v.get("eval_note"):
        console.print(f"note: {escape(v['eval_note'])}")
    _print_verdict(v.get("verdict") or ("PASS" if v["passed"] else "FAIL: a measure is outside its budget"), v["passed"])


def _print_verdict(verdict: str, passed: bool) -> None:
    """A validation's verdict line (loradeploy.verdict), its first word coloured."""
    head, sep, rest = verdict.partition(" ") if verdict.startswith("PASS") else verdict.partition(":")
    console.print(f"[{'green' if passed else 'bold red'}]{head}[/]{escape(sep + rest)}")


def print_export(record: dict) -> None:
    for a in record["adapters"]:
        console.print(f"{a['name']} ({a['method']}): rank {a['rank_total'][0]} → {a['rank_total'][1]}, "
                      f"LoRA bytes {human_bytes(a['lora_bytes'][0])} → {human_bytes(a['lora_bytes'][1])}")
    print_validation({**record, "target": record["target"]["name"]})
    console.print(f"wrote {record['artifact']} ({human_bytes(record['validation']['artifact_bytes'])}): "
                  f"{', '.join(f['path'] for f in record['files'])}, manifest.json, report.html")


def print_plan(record: dict) -> None:
    """One row per adapter: bytes, formats, measured fidelity, and B-LoRA's starting plan."""
    budget = record.get("budget") or {}
    title = escape(f"precision plan ({record['method']}) for {record['target']} [{record['runtime']}]")
    if "max" in budget:
        title += f", budget {budget['measure']} ≤ {budget['max']:g}"
    elif "max_bytes" in budget:
        title += f", at most {budget['max_bytes']:,} bytes"
    table = Table(title=title, show_edge=False)
    held_out = budget.get("held_out") or {}
    for col in ("adapter", "plan", "bytes", "of dense fp16", "formats", "measured (PyTorch)", "held-out texts"):
        table.add_column(col, justify="left" if col in ("adapter", "plan", "formats") else "right")
    notes = []
    for name, a in record["adapters"].items():
        measured = ", ".join(f"{k} {v:.4g}" for k, v in (a.get("measured_pytorch") or {}).items())
        formats = ", ".join(f"{k}×{v}" for k, v in a["format_counts"].items())
        share = f"{a['bytes'] / a['bytes_dense_fp16_max_rank']:.1%}"
        h = a.get("held_out")
        there = f"{budget['measure']} {h['measured'][budget['measure']]:.4g}" if h and "measure" in budget else ""
        table.add_row(escape(name), a.get("chosen_from", a["chosen_by"]), human_bytes(a["bytes"]), share,
                      formats, measured, there)
        if h and h.get("backed_off_from"):
            notes.append(f"{name}: the search's plan of {h['backed_off_from']:,} bytes did not hold on the held-out "
                         f"texts; backed off to {a['bytes']:,} bytes")
        start = a.get("start_plan")
        if start:
            m = ", ".join(f"{k} {v:.4g}" for k, v in start.items() if k not in ("formats", "bytes"))
            table.add_row(escape(name), "B-LoRA bit hints", human_bytes(start["bytes"]),
                          f"{start['bytes'] / a['bytes_dense_fp16_max_rank']:.1%}", "", m, "")
    console.print(table)
    if held_out.get("texts") and "max" in budget:
        console.print(f"held-out texts: {held_out['texts']}, after the calibration texts; a plan must stay within "
                      f"{held_out['slack']} × the budget there")
    elif held_out.get("texts") and "measure" in budget:
        console.print(f"held-out texts: {held_out['texts']}, after the calibration texts; of the plans within the "
                      f"bytes, the one with the least {budget['measure']} there is kept")
    for note in notes:
        console.print(escape(note))
    if "output" in record:
        console.print(f"wrote {record['output']}")


def _ab_answer(answer: dict) -> str:
    if "name" in answer:
        return f"{answer['name']} ({answer['score']:.2f})"
    if "text" in answer:
        text = answer["text"].replace("\n", "\\n")
        return repr(text if len(text) <= 60 else text[:59] + "…")
    return f"{answer['dim']}-d embedding, norm {answer['norm']:.3g}"


def print_ab(record: dict) -> None:
    """Every request's arm and answer, then one row per arm of an A/B run: adapter, requests,
    answers per class, latency (mean; p50/p95 histogram estimates)."""
    served = Table(title=escape(f"{record['requests']} requests served"), show_edge=False)
    for col in ("#", "key", "arm", "answer", "ms", "arms agree"):
        served.add_column(col, justify="left" if col in ("key", "arm", "answer") else "right")
    for r in record["served"]:
        served.add_row(str(r["request"]), escape(r["key"]), escape(r["arm"]), escape(_ab_answer(r["answer"])),
                       f"{r['latency_ms']:.3g}", "yes" if r["agrees"] else "[yellow]no[/]")
    console.print(served)
    router = record["router"]
    table = Table(title=escape(f"A/B on {record['artifact']} [{record['runtime']}], {record['requests']} requests"),
                  show_edge=False)
    for col in ("arm", "adapter", "weight", "requests", "share", "answers", "mean ms", "p50 ms", "p95 ms", "errors"):
        table.add_column(col, justify="left" if col in ("arm", "adapter", "answers") else "right")
    total = max(router["requests"], 1)
    ms = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for name, a in router["arms"].items():
        lat, summary = a["latency_ms"], record["arms"][name]
        answers = ", ".join(f"{k} {n}" for k, n in summary.get("labels", {}).items()) or \
            (f"{summary['new_tokens_mean']:.3g} tokens each" if summary.get("new_tokens_mean") is not None else "")
        table.add_row(escape(name), escape(a["adapter"] or "(base)"), f"{a['weight']:.0%}", str(a["requests"]),
                      f"{a['requests'] / total:.1%}", escape(answers), ms(summary["latency_ms_mean"]),
                      ms(lat["p50"]), ms(lat["p95"]), str(a["errors"]))
    console.print(table)
    if record["agreement"] is not None:
        console.print(f"arms agree ({record['agreement_measure']}) on {record['agreement']:.1%} of "
                      f"{record['requests']} inputs")


def print_check(record: dict) -> None:
    table = Table(title=escape(f"check {record['artifact']} against {record['baseline']}"), show_edge=False)
    for col in ("measure", "baseline", "now", "change", "allowed", "status"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    from .check import info_notes

    colors = {"PASS": "green", "FAIL": "bold red", "NEW": "dim", "GONE": "dim", "INFO": "yellow"}
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for r in record["rows"]:
        table.add_row(escape(r["name"]), fmt(r["baseline"]), fmt(r["now"]), r["change"], escape(r["allowed"]),
                      f"[{colors[r['status']]}]{r['status']}[/]")
    console.print(table)
    for note in info_notes(record):
        console.print(f"[{'bold red' if note.startswith('FAIL') else 'yellow'}]{escape(note)}[/]")
    if record.get("ungated"):
        _print_verdict(record["validation"]["verdict"], False)
    changed = [r["name"] for r in record["rows"] if r["kind"] == "file"]
    if record["passed"] or record["regressions"]:
        console.print("[green]PASS[/]: no regression" if record["passed"] else
                      f"[bold red]FAIL[/]: {'not as exported, nothing measured: ' if changed else 'regressed '}"
                      f"{escape(', '.join(record['regressions']))}")


def print_verify(record: dict) -> None:
    for p in record["problems"]:
        console.print(f"[bold red]FAIL[/] {escape(p['file'])}: {escape(p['problem'])}")
    for note in record.get("notes", []):
        console.print(f"[yellow]note[/]: {escape(note)}")
    if record["ok"]:
        loaded = f", loaded in {record['runtime']} and ran {', '.join(record['ran'])}" if record["loaded"] else ""
        console.print(f"[green]OK[/] {escape(record['artifact'])}: {record['files_checked']} files match the "
                      f"manifest{escape(loaded)}")


def print_targets(profiles: list[dict]) -> None:
    table = Table(show_edge=False)
    for col in ("target", "runtime", "precision", "mode", "description"):
        table.add_column(col, justify="left")
    for p in profiles:
        table.add_row(p["name"], p["runtime"], p["precision"], p["mode"], p["description"])
    console.print(table)


class progress_steps:
    """Progress of a long command, on stderr so that stdout stays the result.

    The callable protocol (``loradeploy.progress``): ``step(message)`` reports a finished stage;
    ``step.begin(message)`` names the stage that starts now. In a terminal a spinner names the
    running stage with its elapsed seconds and each finished stage is printed once; when stderr
    is not a terminal (CI logs, pipes) each begin and end is one plain timestamped line, printed
    as it happens."""

    def __init__(self, enabled: bool = True):
        self._console = Console(stderr=True, highlight=False)
        self._live = enabled and self._console.is_terminal
        self._plain = enabled and not self._live
        self._status = None
        self._t0 = self._since = time.monotonic()
        self._stage = "starting"

    def __enter__(self):
        if self._live:
            self._status = self._console.status(self._stage)
            self._status.__enter__()
        return self

    def _line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp} +{time.monotonic() - self._t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def begin(self, message: str) -> None:
        self._stage, self._since = message, time.monotonic()
        if self._status is not None:
            self._status.update(f"{message} …")
        elif self._plain:
            self._line(f"{message} …")

    def __call__(self, message: str) -> None:
        took = time.monotonic() - self._since
        self._since = time.monotonic()
        if self._status is not None:
            self._console.print(f"[dim]✓ {escape(message)} ({took:.1f} s)[/]")
            self._status.update(f"{self._stage} (continuing) …")
        elif self._plain:
            self._line(f"done: {message} ({took:.1f} s)")

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)


def print_fleet(index: dict) -> None:
    """The adapter × target table of a fleet run, and where its index is."""
    from .fleet.index import grid

    targets, rows = grid(index)
    table = Table(title=f"fleet: {index['summary']['units']} units", show_lines=False)
    table.add_column("adapter")
    for t in targets:
        table.add_column(t)
    colour = {"pass": "green", "fail": "red", "error": "yellow"}
    for a, units in rows:
        row = [a]
        for u in units:
            if u is None:
                row.append("")
                continue
            text = f"[{colour[u['status']]}]{u['status'].upper()}[/]"
            if u.get("bytes") is not None:
                text += f" {human_bytes(u['bytes'])}"
            if not u["ran"]:
                text += " [dim](up to date)[/]"
            if u.get("failed"):
                text += "\n" + escape(", ".join(u["failed"]))
            if u.get("message"):
                text += "\n" + escape(u["message"][:200])
            row.append(text)
        table.add_row(*row)
    console.print(table)
    s, f = index["summary"], index["fleet"]
    console.print(f"{s['pass']} pass, {s['fail']} fail, {s['error']} error; {s['ran']} ran, {s['up_to_date']} up to "
                  f"date; {f['wall_seconds']} s ({f['executor']}"
                  + (f", {f['workers']} worker{'s' if f['workers'] != 1 else ''}" if f.get("workers") else "")
                  + (f", shard {f['shard']}" if f.get("shard") else "")
                  + (f", in the resident worker pid {f['resident_worker']['pid']}" if f.get("resident_worker") else "")
                  + ")")
    if f.get("out"):
        console.print(f"wrote {f['out']}/index.json, index.html, junit.xml")


class fleet_progress:
    """A progress bar over a fleet's units on stderr, a line per finished unit (its status and
    time); plain timestamped lines when stderr is not a terminal."""

    def __init__(self):
        self._console = Console(stderr=True, highlight=False)
        self._bar = None
        self._task = None
        self._t0 = time.monotonic()

    def __enter__(self):
        return self

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self._t0:6.1f}s] {text}", file=sys.stderr,
                  flush=True)

    def __call__(self, kind: str, *args) -> None:
        if kind == "start":
            total, todo = args
            if self._console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._bar = Progress(TextColumn("units"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=self._console)
                self._bar.__enter__()
                self._task = self._bar.add_task("units", total=total)
            else:
                self._line(f"{total} units: {todo} to run, {total - todo} up to date")
        elif kind == "note":
            self._line(escape(args[0]) if self._bar is not None else args[0])
        elif kind == "unit":
            uid, result = args
            status = result.get("status", "error")
            how = f"{result.get('seconds', 0):.1f} s" if result.get("ran", True) else "up to date"
            text = f"{status.upper():5} {uid} ({how})"
            if result.get("message"):
                text += f": {result['message']}"
            self._line(escape(text) if self._bar is not None else text)
            if self._bar is not None:
                self._bar.advance(self._task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
