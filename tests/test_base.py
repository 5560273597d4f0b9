"""The one base loader: a GGUF's tokenizer is converted once and then read from the cache."""

import pytest

from loradeploy.base import load_tokenizer, resolve_base

pytestmark = pytest.mark.slow

TEXTS = ["The hotel room was clean.", "  spaces\tand\nnewlines ", "émoji 🙂 and 中文", ""]


def test_a_gguf_tokenizer_is_converted_once_and_tokenizes_as_the_gguf(tmp_path, monkeypatch):
    import transformers

    original = transformers.AutoTokenizer.from_pretrained
    gguf = resolve_base("gemma3-270m")
    monkeypatch.setenv("LORADEPLOY_CACHE", str(tmp_path))
    first = load_tokenizer(gguf)
    (cached,) = (tmp_path / "tokenizers").iterdir()
    assert (cached / "tokenizer_config.json").is_file()
    direct = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, **kw: no_gguf() if "gguf_file" in kw else original(path, **kw))
    again = load_tokenizer(gguf)
    for text in TEXTS:
        assert again(text)["input_ids"] == first(text)["input_ids"] == direct(text)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token) == (direct.bos_token, direct.eos_token, direct.pad_token)
    assert len(again) == len(direct) == 262144

