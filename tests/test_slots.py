"""Which modules of a base get LoRA slots (loradeploy.slots) on the real MiniLM base."""

import pytest

from loradeploy import base_slots
from loradeploy.adapters import read_adapter
from loradeploy.errors import LoradeployError
from loradeploy.prune import prune
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS


@pytest.fixture(scope="module")
def minilm():
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.ir import Task

    return load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2)


@pytest.fixture(scope="module")
def sora():
    return prune(read_adapter(EXAMPLE_ADAPTERS / "sora"))[0]


def test_blocks_are_every_linear_of_every_layer(minilm):
    chosen = base_slots.choose(minilm, [], "blocks")
    per_layer = {n.split(".", 4)[4] for n in chosen}
    assert per_layer == {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"}
    assert len(chosen) == 36 and "bert.pooler.dense" not in chosen and "classifier" not in chosen
    assert list(chosen)[6].startswith("bert.encoder.layer.1.")  # natural order
    assert chosen["bert.encoder.layer.0.intermediate.dense"] == (384, 1536)


def test_adapters_only_and_named_suffixes(minilm, sora):
    only = base_slots.choose(minilm, [sora], "adapters")
    assert len(only) == len(sora.modules) < 36
    more = base_slots.choose(minilm, [sora], "adapters,pooler.dense,key")
    keys = {f"bert.encoder.layer.{i}.attention.self.key" for i in range(6)}
    assert set(more) == set(only) | keys | {"bert.pooler.dense"} and not keys <= set(only)
    assert base_slots.choose(minilm, [sora], None) == base_slots.choose(minilm, [], "blocks")


@pytest.mark.parametrize("spec, message", [("nonexistent", "matches no linear layer"),
                                           ("query;drop", "is not a module name")])
def test_bad_slot_specs(minilm, spec, message):
    with pytest.raises(LoradeployError, match=message):
        base_slots.choose(minilm, [], spec)


def test_cli_refuses_a_bad_slot_spec_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", str(EXAMPLE_ADAPTERS / "sora"), "--target",
                            "onnx-cpu", "--slots", "adapters,nonexistent", "-o", str(out)], "nonexistent")
    assert not out.exists()


def test_profile_slots_key_is_checked(tmp_path):
    from loradeploy.errors import ProfileError
    from loradeploy.profile import load_profile

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nruntime: onnxruntime\nprecision: fp32\nslots: [query]\n")
    with pytest.raises(ProfileError, match="slots must be a string"):
        load_profile(str(path))
    path.write_text("name: p\nruntime: onnxruntime\nprecision: fp32\nslots: adapters,pooler.dense\n")
    assert load_profile(str(path)).slots == "adapters,pooler.dense"


def test_norms_are_every_layernorms_weight_and_bias_and_in_the_default(minilm):
    from loradeploy.slots import DEFAULT, parse

    norms = base_slots.norm_parameters(minilm, "norms")
    assert len(norms) == 2 * (2 * 6 + 1)  # attention-output and output LayerNorm of 6 layers, the embeddings'
    assert set(norms[:2]) == {"bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"}
    assert "bert.encoder.layer.5.output.LayerNorm.bias" in norms and not any("dense" in n for n in norms)
    assert norms.index("bert.encoder.layer.1.output.LayerNorm.weight") < norms.index("bert.encoder.layer.4.attention.output.LayerNorm.weight")
    assert parse(None) == parse(DEFAULT) == ("blocks", "norms")
    assert base_slots.norm_parameters(minilm, None) == norms
    assert base_slots.norm_parameters(minilm, "blocks") == [] == base_slots.norm_parameters(minilm, "adapters,query")
    assert base_slots.choose(minilm, [], "blocks,norms") == base_slots.choose(minilm, [], "blocks")
