"""The bundle's index.html in headless Chromium (puppeteer-core, the system's browser): the page's
session gives the Node session's outputs for adapter A, B and none."""

import numpy as np
import pytest

from loradeploy.plugins.onnx_web.browser import BROWSER_ATOL, find_chromium, run_in_browser
from tests.plugins.onnx_web.conftest import ADAPTERS

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
