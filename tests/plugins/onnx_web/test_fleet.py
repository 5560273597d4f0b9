"""A fleet of onnx-web bundles: one graph, base tensors and web files built once, hard-linked
into each adapter's bundle; each bundle validates, passes its browser check and verifies alone."""

import json
import os

import pytest

from loradeploy.cli import main
from loradeploy.plugins.onnx_web.browser import find_chromium
from tests.support.fleet import copy_examples, write_spec
from tests.support.profiles import quick_profile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SHARED = ("model.onnx", "base.safetensors", "ort/ort-wasm-simd-threaded.wasm", "loradeploy.mjs")


def test_fleet_bundles_share_one_graph_and_stand_alone(tmp_path, web_eval):
    examples = copy_examples(tmp_path, ("sora", "increlora"))
    profile = quick_profile(tmp_path, "onnx-web", runs=1)
    spec = write_spec(tmp_path, list(examples.values()), [str(profile)], eval=str(web_eval), mode="swappable")
    out = tmp_path / "out"
    assert main(["fleet", "run", str(spec), "-o", str(out), "--workers", "1", "--json"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["passed"] and sorted(u["id"] for u in index["units"]) == ["onnx-web/increlora", "onnx-web/sora"]
    for rel in SHARED:
        inodes = {os.stat(out / u["id"] / rel).st_ino for u in index["units"]}
        (shared,) = out.glob(f"_shared/onnx-web/*/{rel}")
        assert inodes == {os.stat(shared).st_ino}, rel
    for u in index["units"]:
        manifest = json.loads((out / u["id"] / "manifest.json").read_text())
        assert manifest["decisions"]["shared_base_graph"] and u["shared_base"]
        assert not (out / u["id"] / "latency").exists() and not (out / u["id"] / "signature.json").exists()
        if find_chromium() is not None:
            assert manifest["validation"]["metrics"]["browser_check"]["status"] == "pass"
        assert main(["verify", str(out / u["id"])]) == 0  # loads in Node and runs its adapter
