"""Artifacts for the ExecuTorch tests, each exported once and validated on the first 24 shipped
eval texts with one short timing run: MiniLM merged (sora folded in) and swappable (sora +
increlora, the shipped example adapters). A tiny BERT with two PEFT adapters of known ranks,
for what does not need MiniLM."""

from pathlib import Path

import pytest

from loradeploy.job import AdapterSpec
from tests.support import tiny_bert
from tests.support.exports import export_adapters
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

ADAPTERS = ("sora", "increlora")
N_TEXTS = 24


@pytest.fixture(scope="session")
def et_eval(tmp_path_factory) -> Path:
    from loradeploy.evaldata import DEFAULT_EVAL

    path = tmp_path_factory.mktemp("et-eval") / "eval.jsonl"
    path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:N_TEXTS]) + "\n")
    return path


@pytest.fixture(scope="session")
def et_profile(tmp_path_factory) -> Path:
    return quick_profile(tmp_path_factory.mktemp("et-profile"), "executorch")


@pytest.fixture(scope="session")
def et_swappable(tmp_path_factory, et_eval, et_profile) -> tuple[Path, dict]:
    """The swappable artifact's folder and its manifest (JSON data)."""
    out = tmp_path_factory.mktemp("et-swappable") / "artifact"
    specs = [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ADAPTERS]
    return out, export_adapters("minilm", specs, et_profile, out, mode="swappable", eval_path=et_eval)


@pytest.fixture(scope="session")
def et_merged(tmp_path_factory, et_eval, et_profile) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("et-merged") / "artifact"
    specs = [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora")]
    return out, export_adapters("minilm", specs, et_profile, out, mode="merged", eval_path=et_eval)


#: tiny-BERT adapters: narrow adapts every block linear but the last at ranks 1–3, wide all but
#: the last two at ranks 2–5 (a slot's largest rank comes from either, or neither adapts it)
TINY_RANKS = {
    "narrow": {m: 1 + i % 3 for i, m in enumerate(tiny_bert.modules()[:-1])},
    "wide": {m: 5 - i % 4 for i, m in enumerate(tiny_bert.modules()[:-2])},
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny BERT folder and its adapters (``TINY_RANKS``) as PEFT folders."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    base = tiny_bert.build(folder / "base")
    return base, {name: tiny_bert.peft_adapter(folder / name, ranks, seed=i + 1)
                  for i, (name, ranks) in enumerate(TINY_RANKS.items())}
