"""Class names travel with a classifier adapter (loradeploy.adapters.common.label_names): read
from the ``id2label`` of the config beside the checkpoint, whichever method wrote it; the
placeholder names transformers writes (``LABEL_i``) name nothing; names that do not fit the head
are left out with a note."""

import json

import pytest

from loradeploy.adapters import read_adapter
from tests.support.synthetic import make_blora, make_increlora, make_sora

CONFIG = {"increlora": "config.json", "blora": "adapter_config.json", "sora": "lora_config.json"}
MAKE = {"increlora": make_increlora, "blora": make_blora, "sora": make_sora}


def _with_id2label(tmp_path, method: str, id2label) -> object:
    syn = MAKE[method](tmp_path / method)
    path = syn.path / CONFIG[method]
    path.write_text(json.dumps({**json.loads(path.read_text()), "id2label": id2label}))
    return read_adapter(syn.path)


@pytest.mark.parametrize("method", sorted(CONFIG))
def test_each_methods_config_names_the_classes(tmp_path, method):
    adapter = _with_id2label(tmp_path, method, {"1": "positive", "0": "negative"})
    assert adapter.num_labels == 2 and adapter.label_names == ("negative", "positive")


def test_placeholder_names_name_nothing(tmp_path):
    adapter = _with_id2label(tmp_path, "increlora", {"0": "LABEL_0", "1": "LABEL_1"})
    assert adapter.label_names is None and not any("id2label" in n for n in adapter.notes)


@pytest.mark.parametrize("id2label, problem", [
    ({"0": "neg", "1": "neutral", "2": "pos"}, "names 3 classes (ids [0, 1, 2]), the head has 2"),
    ({"0": "neg", "2": "pos"}, "names 2 classes (ids [0, 2])"),
    ({"first": "neg", "second": "pos"}, "keys are not label ids")])
def test_names_that_do_not_fit_the_head_are_left_out_with_a_note(tmp_path, id2label, problem):
    adapter = _with_id2label(tmp_path, "increlora", id2label)
    assert adapter.label_names is None
    assert any(n.startswith("config.json: id2label") and problem in n for n in adapter.notes), adapter.notes
