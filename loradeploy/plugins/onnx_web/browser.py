"""The browser check of a web bundle: headless Chromium (the system's, driven by puppeteer-core in
``web/bin/browser-check.mjs``) opens the bundle's ``index.html`` from a static server on
127.0.0.1 and runs the bundle's example texts through the page's session with every adapter and
with none; the outputs must equal the Node session's within :data:`BROWSER_ATOL`. Without a
Chromium the check is recorded as not run, never as a pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .node import WEB_DIR, node_binary

BROWSER_ATOL = 1e-5  # max |Δ| between the page's outputs and Node's, same bundle, same inputs
TIMEOUT_S = 300
NOT_RUN = "not run (no chromium)"
#: LM bundles: what the page returns per text — the last position's first ``width`` logits (a whole
#: vocabulary per position is too much for one JSON reply) and ``tokens`` greedy tokens (KV cache)
LM_SAMPLE = {"width": 1024, "tokens": 8}


def _node_lm(session, texts, adapter) -> tuple[np.ndarray, list]:
    """What the page returns for an LM bundle, computed by the Node session."""
    logits, tokens = [], []
    for text in texts:
        ids = session.tokenize(text)
        logits.append(session.logits(ids, adapter)[-1, :LM_SAMPLE["width"]])
        tokens.append(session.greedy(ids, adapter, LM_SAMPLE["tokens"]))
    return np.asarray(logits), tokens


def find_chromium() -> str | None:
    """``LORADEPLOY_CHROMIUM``, else Debian's ``chromium`` (or another Chromium) on the PATH."""
    given = os.environ.get("LORADEPLOY_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def run_in_browser(bundle: Path, texts: list[str], adapters: list[str | None], chromium: str,
                   screenshot: Path | None = None, ab_scenario: dict | None = None) -> dict:
    """The page's outputs per adapter ('' for none), the browser's version, the page's status line;
    with ``ab_scenario`` (options of ``web/test/ab-scenario.mjs``) also ``ab``, what it returned."""
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        ask = {"texts": texts, "adapters": adapters, "lm": LM_SAMPLE} | ({"ab_scenario": ab_scenario} if ab_scenario else {})
        request.write_text(json.dumps(ask))
        cmd = [node_binary(), str(WEB_DIR / "bin" / "browser-check.mjs"), str(bundle), str(request), str(result),
               chromium] + ([str(screenshot)] if screenshot else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the browser run did not finish in {TIMEOUT_S} s") from None
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the browser run failed ({tail[:300]})")
        return json.loads(result.read_text())


def browser_check(session, progress=None) -> tuple[dict, list]:
    """Metrics ``{"browser_check": {...}}`` and the row judging the largest difference."""
    say = progress or (lambda _m: None)
    chromium = find_chromium()
    if chromium is None:
        say("browser check not run: no Chromium found (install Debian's chromium or set LORADEPLOY_CHROMIUM)")
        return {"browser_check": {"status": NOT_RUN}}, []
    texts = list(session.config["examples"])
    adapters = [None, *session.adapters]
    lm = session.is_lm
    node = {a or "": _node_lm(session, texts, a) if lm else session.run_texts(texts, a) for a in adapters}
    try:
        page = run_in_browser(session.artifact, texts, adapters, chromium)
    except RuntimeError as e:
        say(f"browser check failed: {e}")
        return {"browser_check": {"status": f"FAIL: {e}", "chromium": chromium}}, \
            [("browser_max_abs_diff", float("inf"), BROWSER_ATOL, "<=")]
    per = {}
    for key, want in node.items():
        rows = page["outputs"].get(key, [])
        if lm:  # a greedy token the page chose otherwise is a failure, whatever the logits say
            want, same = want[0], [r["tokens"] for r in rows] == want[1]
            rows = [r["logits"] for r in rows] if same else []
        got = np.asarray(rows, dtype=np.float64)
        per[key or "none"] = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    worst = max(per.values())
    status = "pass" if worst <= BROWSER_ATOL and not page["errors"] else "FAIL"
    say(f"browser check in {page['browser']}: max |Δ| {worst:.2e} against Node over {len(texts)} texts, "
        f"adapters {', '.join(per)}")
    metrics = {"status": status, "browser": page["browser"], "max_abs_diff": worst, "per_adapter": per,
               "texts": len(texts), "page_errors": page["errors"], "budget": BROWSER_ATOL}
    return {"browser_check": metrics}, [("browser_max_abs_diff", worst if not page["errors"] else float("inf"),
                                         BROWSER_ATOL, "<=")]
