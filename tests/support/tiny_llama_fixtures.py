"""Module fixtures for llama.cpp tests on the tiny llama model (import them into the test module)."""

from __future__ import annotations

import pytest

from tests.support import tiny_llama
from tests.support.profiles import quick_profile

TEXTS = ["The soup was not good, but the staff were lovely.", "I would buy this camera again.",
         "Hardly worth the price, sadly."]


def fast_profile(tmp_path, name: str, **changes) -> str:
    return str(quick_profile(tmp_path, name, runs=2, shapes=[{"batch": 1, "seq": 32}], **changes))


@pytest.fixture(scope="module")
def gemma():
    from loradeploy.base import resolve_base

    return resolve_base("gemma3-270m")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gemma):
    """A tiny llama model with Gemma's tokenizer, as a Hugging Face folder and a GGUF, and a
    SoRA adapter for it: (hf folder, gguf path, adapter folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    hf, path = tiny_llama.build(folder, gemma)
    return hf, path, tiny_llama.sora_adapter(folder / "adapter")
