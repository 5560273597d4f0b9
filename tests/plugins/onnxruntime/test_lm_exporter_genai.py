"""onnxruntime-genai reproduces loradeploy's tokens on a Gemma 3 270M artifact (slow: one real
export, shared by the module): og's tokenizer gives the ids loradeploy's tokenizer gives on the
eval prompts (BOS included), og's greedy loop generates the tokens of ``runtime.open(...).greedy``
with and without the adapter, and docs/onnxruntime.md's onnxruntime-genai program runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loradeploy import runtime
from loradeploy.evaldata import DEFAULT_LM_EVAL
from loradeploy.job import AdapterSpec
from tests.support.og_greedy import og_greedy
from tests.support.paths import EXAMPLE_ADAPTERS, REPO
from tests.support.profiles import lm_eval_head, quick_profile
from tests.support.exports import export_adapters

pytestmark = pytest.mark.slow

N_GREEDY = 16  # tokens compared per prompt
GREEDY_PROMPTS = 3  # the first eval prompts, each with and without the adapter
#: docs/onnxruntime.md's onnxruntime-genai program: the ```python block after this marker
DOC_MARKER = "<!-- tested: tests/targets/test_onnx_lm_genai.py -->"


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """The README's LM example: Gemma 3 270M + sora-gemma on onnx-cpu-int4, swappable, the
    adapter named as the README names it, validated on 4 eval texts."""
    folder = tmp_path_factory.mktemp("og")
    export_adapters("gemma3-270m", [AdapterSpec("sora-gemma", EXAMPLE_ADAPTERS / "sora-gemma")],
                    str(quick_profile(folder, "onnx-cpu-int4")), folder / "out", mode="swappable",
                    eval_path=lm_eval_head(folder, 4))
    return folder / "out"


def _og_tokenizer(model):
    """og's tokenizer as the README's program sets it up: its special tokens on."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")
    return tokenizer


def test_og_tokenizer_gives_loradeploys_ids_on_the_eval_prompts(art):
    import onnxruntime_genai as og

    prompts = [p for p in DEFAULT_LM_EVAL.read_text().splitlines() if p.strip()]
    tokenizer = _og_tokenizer(og.Model(str(art)))
    with runtime.open(art, adapters=False) as session:
        ours = [session.tokenize(p) for p in prompts]
    assert all(ids[0] == 2 for ids in ours)  # Gemma's <bos>
    assert [[int(i) for i in tokenizer.encode(p)] for p in prompts] == ours


def test_og_greedy_generation_equals_loradeploys_with_and_without_the_adapter(art):
    import onnxruntime_genai as og

    model = og.Model(str(art))
    tokenizer = _og_tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(art / "adapters" / "sora-gemma.onnx_adapter"), "sora-gemma")
    prompts = DEFAULT_LM_EVAL.read_text().splitlines()[:GREEDY_PROMPTS]
    with runtime.open(art) as session:
        for prompt in prompts:
            ids = [int(i) for i in tokenizer.encode(prompt)]
            ours = {a: session.greedy(ids, a, N_GREEDY) for a in ("sora-gemma", None)}
            assert ours["sora-gemma"] != ours[None]  # the adapter changes the answer: both paths are checked
            for adapter, tokens in ours.items():
                assert og_greedy(model, adapters, ids, adapter, N_GREEDY) == tokens, (prompt, adapter)


def test_the_readmes_onnxruntime_genai_program_runs_and_prints_loradeploys_text(art):
    """The docs' program, extracted as written, run on the exported artifact: it prints the
    prompt's continuation, which is loradeploy's greedy generation with the adapter."""
    text = (REPO / "docs" / "onnxruntime.md").read_text()
    assert DOC_MARKER in text
    program = re.search(r"```python\n(.*?)```", text[text.index(DOC_MARKER):], re.S)[1]
    run = subprocess.run([sys.executable, "-c", program, str(art)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    prompt = re.search(r'PROMPT = "([^"]+)"', program)[1]
    max_length = int(re.search(r"max_length=(\d+)", program)[1])
    with runtime.open(art) as session:
        ids = session.tokenize(prompt)
        want = session.generate(prompt, "sora-gemma", max_length - len(ids))
    assert want.text.strip() and run.stdout.strip() == (prompt + want.text).strip()
