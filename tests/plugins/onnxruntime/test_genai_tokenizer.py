"""onnxruntime-genai's tokenizer on an exported decoder (loradeploy.plugins.onnxruntime.genai_tokenizer), on a
tiny Llama whose tokenizer adds ``<bos>``: the artifact states the special tokens its tokenizer
adds in ``tokenizer_module.json`` (listed with its sha256 in the manifest); og's tokenizer, with
its special tokens on, then gives loradeploy's ids, also for a tokenizer whose pair template holds
the EOS token, on which og alone would append EOS to every text. (Gemma 3's own tokenizer:
test_onnx_lm_genai.py, slow.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loradeploy import runtime
from loradeploy.fsutil import file_sha256
from loradeploy.job import AdapterSpec
from loradeploy.plugins.onnxruntime.genai_tokenizer import MODULE_FILE, special_token_flags, write_special_tokens
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters
from tests.support import tiny_lm

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a b c"]
BOS, EOS = {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"SpecialToken": {"id": "<eos>", "type_id": 0}}
SEQ_A, SEQ_B = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("genai-tok")
    base = tiny_lm.build(root / "hf", "llama")
    (root / "eval.txt").write_text("\n".join(TEXTS) + "\n")
    manifest = export_adapters(str(base), [AdapterSpec("a", tiny_lm.peft_adapter(root / "a", base))],
                               str(quick_profile(root, "onnx-cpu")), root / "art", mode="swappable",
                               eval_path=root / "eval.txt")
    return root / "art", manifest


def _og_ids(folder: Path, special_tokens: bool) -> list[list[int]]:
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(folder)))
    if special_tokens:
        tokenizer.update_options(add_special_tokens="true")
    return [[int(i) for i in tokenizer.encode(t)] for t in TEXTS]


def test_the_artifact_states_its_special_tokens_in_a_file_the_manifest_lists(art):
    folder, manifest = art
    flags = {"add_bos_token": True, "add_eos_token": False}  # tiny_lm's tokenizer: "<bos> $A"
    assert json.loads((folder / MODULE_FILE).read_text()) == flags
    assert manifest["decisions"]["tokenizer_special_tokens"] == flags
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert listed[MODULE_FILE] == file_sha256(folder / MODULE_FILE)


def test_og_tokenizer_with_its_special_tokens_on_gives_loradeploys_ids(art):
    folder, _ = art
    with runtime.open(folder, adapters=False) as session:
        ours = [session.tokenize(t) for t in TEXTS]
    assert all(ids[0] == 2 for ids in ours)
    assert _og_ids(folder, special_tokens=True) == ours
    # og's default leaves every special token out (what the README's program turns on)
    assert _og_ids(folder, special_tokens=False) == [ids[1:] for ids in ours]


def test_the_stated_flags_keep_og_from_appending_an_eos_the_tokenizer_does_not_add(art, tmp_path):
    """A tokenizer whose pair template holds ``<eos>`` adds none to a single text; og, left to
    search the post-processor, appends one, and stops once ``tokenizer_module.json`` says so."""
    import transformers

    folder = tmp_path / "eos-in-pair"
    shutil.copytree(art[0], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing", "single": [BOS, SEQ_A], "pair": [BOS, SEQ_A, EOS, SEQ_B, EOS],
                              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]},
                                                 "<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    want = [hf(t)["input_ids"] for t in TEXTS]
    assert all(ids[0] == 2 and ids[-1] != 1 for ids in want)
    (folder / MODULE_FILE).unlink()
    assert _og_ids(folder, special_tokens=True) == [ids + [1] for ids in want]
    assert write_special_tokens(folder, hf) == {"add_bos_token": True, "add_eos_token": False}
    assert _og_ids(folder, special_tokens=True) == want


@pytest.mark.parametrize("single, flags", [
    ([BOS, SEQ_A], (True, False)), ([SEQ_A], (False, False)), ([BOS, SEQ_A, EOS], (True, True)),
    ([SEQ_A, EOS], (False, True))])
def test_special_token_flags_are_what_the_tokenizer_adds(single, flags):
    from tokenizers import processors

    tokenizer = tiny_lm.tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join("$A" if "Sequence" in p else p["SpecialToken"]["id"] for p in single),
        special_tokens=[("<bos>", 2), ("<eos>", 1)])
    assert special_token_flags(tokenizer) == {"add_bos_token": flags[0], "add_eos_token": flags[1]}
