import os
import tempfile
from pathlib import Path

import pytest

from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import lm_eval_head, quick_profile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `fleet run` hands its run to a resident worker answering on this socket: tests never reach a
# worker the developer started; those that want one start their own on it
os.environ["LORADEPLOY_FLEET_SOCKET"] = os.path.join(tempfile.mkdtemp(prefix="ld-test-"), "fleet.sock")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from loradeploy.base import resolve_base

    return resolve_base("minilm")


@pytest.fixture(scope="session")
def gemma_pair_art(tmp_path_factory) -> tuple[Path, dict]:
    """Gemma 3 270M on llama.cpp (``gguf-cpu``, swappable) with the two shipped Gemma adapters,
    ``sora`` and ``increlora``: exported once for the tests that check switching and serving
    (each Gemma export takes minutes here), validated on the first 24 of the 64 shipped LM eval
    texts (about 900 tokens). Returns the artifact folder and its manifest."""
    from loradeploy.job import AdapterSpec
    from tests.support.exports import export_adapters

    folder = tmp_path_factory.mktemp("gemma-pair")
    specs = [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora-gemma"),
             AdapterSpec("increlora", EXAMPLE_ADAPTERS / "increlora-gemma")]
    profile = quick_profile(folder, "gguf-cpu", runs=2, shapes=[{"batch": 1, "seq": 32}])
    record = export_adapters("gemma3-270m", specs, profile, folder / "art", eval_path=lm_eval_head(folder, 24))
    return folder / "art", record
