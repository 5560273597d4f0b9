"""The bundle's index.html in headless Chromium (puppeteer-core, the system's browser): the page's
session gives the Node session's outputs for adapter A, B and none, and its A/B router answers
every concurrent call with its arm's adapter while arms are replaced."""

import numpy as np
import pytest

from loradeploy.plugins.onnx_web.browser import BROWSER_ATOL, find_chromium, run_in_browser
from tests.plugins.onnx_web.conftest import ADAPTERS
from tests.support.web_ab import AB_OPTIONS, ab_files, check_ab_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_page_outputs_equal_node_outputs(web_bundle, tmp_path):
    from loradeploy import runtime
    from loradeploy.evaldata import load_eval

    folder, _ = web_bundle
    texts = load_eval(None).texts[10:16] + ["a much longer review " * 40]
    adapters = [None, *ADAPTERS]
    shot = tmp_path / "page.png"
    page = run_in_browser(folder, texts, adapters, CHROMIUM, screenshot=shot)
    assert not page["errors"] and "base loaded" in page["status"] and shot.stat().st_size > 1000
    with runtime.open(folder, threads=1) as session:
        node = {a: session.run_texts(texts, a) for a in adapters}
    for a in adapters:
        got = np.asarray(page["outputs"][a or ""], dtype=np.float64)
        assert got.shape == node[a].shape and np.abs(got - node[a]).max() <= BROWSER_ATOL, a
    # the three differ, so a page that ignored the adapter would fail
    assert np.abs(node["sora"] - node["increlora"]).max() > 1e-2 and np.abs(node["sora"] - node[None]).max() > 1e-2


def test_no_chromium_is_recorded_as_not_run_never_a_pass(web_bundle, monkeypatch):
    from loradeploy import runtime
    from loradeploy.plugins.onnx_web.browser import NOT_RUN, browser_check

    folder, _ = web_bundle
    monkeypatch.setenv("LORADEPLOY_CHROMIUM", str(folder / "no-such-browser"))
    said = []
    with runtime.open(folder, threads=1) as session:
        metrics, rows = browser_check(session, said.append)
    assert metrics == {"browser_check": {"status": NOT_RUN}} and rows == []
    assert len(said) == 1 and "no Chromium" in said[0]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_a_page_that_mixes_up_adapters_fails_the_check(web_bundle, tmp_path):
    """The page loads each adapter's file under the other's name: the check must fail."""
    import shutil

    from loradeploy import runtime
    from loradeploy.plugins.onnx_web.browser import browser_check

    folder, _ = web_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    page = (copy / "index.html").read_text()
    loop = "for (const [name, file] of Object.entries(session.config.adapters)) {"
    assert loop in page
    swapped = "const files = Object.values(session.config.adapters).reverse();\n" \
              "    for (const [i, name] of Object.keys(session.config.adapters).entries()) { const file = files[i];"
    (copy / "index.html").write_text(page.replace(loop, swapped))
    with runtime.open(copy, threads=1) as session:
        metrics, rows = browser_check(session)
    check = metrics["browser_check"]
    assert check["status"] == "FAIL" and check["per_adapter"]["none"] <= BROWSER_ATOL
    assert check["per_adapter"]["sora"] > 1e-2
    ((measure, value, budget, direction),) = rows
    assert measure == "browser_max_abs_diff" and value > budget


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_bad_input_in_the_page_is_a_rejected_promise_naming_it(web_bundle, tmp_path):
    import shutil

    folder, _ = web_bundle
    with pytest.raises(RuntimeError, match="adapter nope is not loaded"):
        run_in_browser(folder, ["fine"], ["nope"], CHROMIUM)
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    (copy / "ort" / "ort-wasm-simd-threaded.wasm").unlink()
    with pytest.raises(RuntimeError, match=r"ort/ort-wasm-simd-threaded\.wasm: cannot be fetched \(HTTP 404\)"):
        run_in_browser(copy, ["fine"], [None], CHROMIUM)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_page_routes_concurrent_calls_while_arms_are_replaced(web_bundle):
    """web/test/ab-scenario.mjs in the page: concurrent routed callers while arms are replaced
    (A: sora → increlora → none → sora from its file → sora) and an adapter is loaded and
    unloaded with calls in flight; every answer is the Node session's output of the adapter its
    arm held at the call's generation: 0 wrong answers."""
    from loradeploy import runtime
    from loradeploy.evaldata import load_eval

    folder, _ = web_bundle
    texts = load_eval(None).texts[:5]
    page = run_in_browser(folder, texts[:1], [None], CHROMIUM, ab_scenario={
        "texts": texts, "files": ab_files(ADAPTERS), "callers": AB_OPTIONS["callers"],
        "perPhase": AB_OPTIONS["per_phase"]})
    assert not page["errors"], page["errors"]
    with runtime.open(folder, threads=1) as session:
        expected = {a: np.stack([session.run_texts([t], a)[0] for t in texts]) for a in (*ADAPTERS, None)}
    counts = check_ab_scenario(page["ab"], expected)
    print(f"A/B in {page['browser']}: {counts}")
