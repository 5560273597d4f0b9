import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ADAPTERS = REPO / "examples" / "adapters"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from loradeploy.base import resolve_base

    return resolve_base("minilm")
