"""One MiniLM web bundle (sora + increlora, the shipped example adapters) exported once for the
onnx-web tests, validated on the first 48 shipped eval texts (the browser check included where a
Chromium is installed); its onnx-web-int8 twin likewise, with the profile's latency budget."""

from pathlib import Path

import pytest

from loradeploy.job import AdapterSpec
from tests.support.exports import export_adapters
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

ADAPTERS = ("sora", "increlora")


@pytest.fixture(scope="session")
def web_eval(tmp_path_factory) -> Path:
    from loradeploy.evaldata import DEFAULT_EVAL

    path = tmp_path_factory.mktemp("web-eval") / "eval.jsonl"
    path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:48]) + "\n")
    return path


@pytest.fixture(scope="session")
def web_bundle(tmp_path_factory, web_eval) -> tuple[Path, dict]:
    """The bundle's folder and its manifest (JSON data)."""
    folder = tmp_path_factory.mktemp("web-bundle")
    profile = quick_profile(folder, "onnx-web", warmup=1, runs=2, shapes=[{"batch": 1, "seq": 32}])
    specs = [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ADAPTERS]
    record = export_adapters("minilm", specs, profile, folder / "bundle", eval_path=web_eval)
    return folder / "bundle", record


@pytest.fixture(scope="session")
def web_int8_bundle(tmp_path_factory, web_eval) -> tuple[Path, dict]:
    """The onnx-web-int8 bundle of the same adapters (timed at b1 s128 against the profile's budget)."""
    folder = tmp_path_factory.mktemp("web-int8-bundle")
    profile = quick_profile(folder, "onnx-web-int8", latency_budget=True, warmup=1, runs=3,
                            shapes=[{"batch": 1, "seq": 128}])
    specs = [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ADAPTERS]
    record = export_adapters("minilm", specs, profile, folder / "bundle", eval_path=web_eval)
    return folder / "bundle", record
