"""ExecuTorch target: merged and swappable MiniLM programs, validated in executorch's runtime
against the fp32 PyTorch reference; the swappable program's per-module rank bounds and adapter
files; an adapter above the profile's bound refused before anything is written; the int8 profile
(on a tiny BERT)."""

import json

import pytest

from tests.plugins.executorch.conftest import ADAPTERS, TINY_RANKS
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile

pytestmark = pytest.mark.slow
ATOL = 1e-4  # fp32: max |Δlogit| of the ExecuTorch program vs the PyTorch reference


def test_merged_program_matches_the_pytorch_reference(et_merged):
    folder, record = et_merged
    validation = record["validation"]
    assert record["mode"] == "merged" and validation["passed"], validation["checks"]
    m = validation["metrics"]["merged"]
    assert m["max_abs_logit"] <= ATOL and m["label_agreement"] == 1.0
    assert "b1xs16" in validation["latency"]["shapes"]
    assert (folder / "model.pte").is_file() and not (folder / "adapters").exists()
    assert record["decisions"]["partition"]["xnnpack_segments"] > 0  # the linears run in XNNPACK


def test_swappable_program_matches_the_reference_for_every_adapter(et_swappable):
    folder, record = et_swappable
    validation = record["validation"]
    assert record["mode"] == "swappable" and validation["passed"], validation["checks"]
    for name in ADAPTERS:
        m = validation["metrics"][name]
        assert m["max_abs_logit"] <= ATOL and m["label_agreement"] == 1.0 and m["adapter_effect_kept"] >= 0.999
    files = {f["path"] for f in record["files"]}
    assert {"model.pte", "base.ptd", "executorch.json"} | {f"adapters/{n}.ptd" for n in ADAPTERS} <= files


def largest_ranks(ranks: list[dict[str, int]], slots) -> dict[str, int]:
    """Per slot, the largest of the adapters' ranks there (1 where none adapts it)."""
    return {m: max([r[m] for r in ranks if m in r], default=1) for m in slots}


def test_each_slot_is_bounded_by_the_largest_rank_the_adapters_have_there(et_swappable):
    """The slot's rank axis is dynamic up to the larger of sora's and increlora's pruned ranks at
    that module (not the profile's rank_bound 16), in the manifest and the program's inputs."""
    from loradeploy.job import AdapterInputs, AdapterSpec, load_entries

    folder, record = et_swappable
    config = json.loads((folder / "executorch.json").read_text())
    entries = load_entries(AdapterInputs.of([AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ADAPTERS]))
    ranks = [{n: int(m.lora_A.shape[0]) for n, m in e.pruned.modules.items()} for e in entries]
    decisions = record["decisions"]
    expected = largest_ranks(ranks, decisions["lora_slot_modules"])
    assert len(expected) == decisions["lora_slots"] == 36  # 6 linears × 6 blocks
    assert decisions["rank_bounds"] == expected and max(expected.values()) == 11 and min(expected.values()) == 1
    assert config["rank_bound"] == decisions["rank_bound"] == record["target"]["profile"]["rank_bound"] == 16
    assert decisions["fixed_rank_bound"] is False
    slots = [i for i in config["inputs"] if i["role"] != "travelling"]
    assert len(slots) == 72
    for spec in slots:
        module = spec["name"].rsplit(".", 1)[0]
        assert spec["shape"][1 if spec["role"] == "lora_A" else 0] == expected[module], spec
        assert (spec.get("rank_axis") == "dynamic") == (expected[module] > 1), spec
    travelling = {i["name"] for i in config["inputs"] if i["role"] == "travelling"}
    assert "classifier.weight" in travelling and any(".LayerNorm." in n for n in travelling)


def test_adapter_files_hold_the_adapters_factors_at_their_own_rank(et_swappable):
    import numpy as np

    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.ir import Task
    from loradeploy.job import AdapterInputs, AdapterSpec, load_entries
    from loradeploy.merge import find_module
    from loradeploy.plugins.executorch.tensor_data import read_tensor_data
    from loradeploy.traced_graph import lora_factors

    folder, record = et_swappable
    base = load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2)
    (entry,) = load_entries(AdapterInputs.of([AdapterSpec("increlora", EXAMPLE_ADAPTERS / "increlora")]))
    expected = lora_factors(entry.pruned, {n: find_module(base, n)[0] for n in entry.pruned.modules})
    tensors, meta = read_tensor_data(folder / "adapters" / "increlora.ptd")
    assert meta["adapter"] == "increlora" and meta["base_fingerprint"] == record["decisions"]["base_fingerprint"]
    assert set(expected) <= set(tensors) and "classifier.weight" in tensors
    for name, arr in expected.items():
        assert tensors[name].shape == arr.shape and np.array_equal(tensors[name], arr), name
    assert max(a.shape[1] for n, a in tensors.items() if n.endswith("lora_A")) == 11  # unpadded


def test_rank_above_the_bound_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    """sora's modules have rank 8: a profile bounding ranks at 4 refuses it before lowering."""
    profile = quick_profile(tmp_path, "executorch", rank_bound=4)
    out = tmp_path / "out"
    line = main_bad_input(capsys, ["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}",
                                   "--target", str(profile), "--mode", "swappable", "-o", str(out)],
                          "has rank 8, above the rank bound 4", "module bert.encoder.layer.")
    assert "rank_bound" in line and not out.exists() and list(tmp_path.iterdir()) == [profile]


def test_int8_profile_quantizes_the_base_linears_and_keeps_the_labels(tmp_path, et_eval, tiny_base):
    """executorch-int8 on a tiny BERT: torchao's dynamic int8 on every linear of the base but the
    head; the labels agree with the fp32 reference, and the logits moved (the quantization
    happened). Its slots are bounded per module by the two adapters' larger rank, 1 where
    neither adapts the module."""
    from loradeploy.job import AdapterSpec
    from tests.support import tiny_bert
    from tests.support.exports import export_adapters

    base, adapters = tiny_base
    profile = quick_profile(tmp_path, "executorch-int8")
    record = export_adapters(str(base), [AdapterSpec(n, adapters[n]) for n in TINY_RANKS], profile, tmp_path / "art",
                             mode="swappable", eval_path=et_eval)
    decisions, validation = record["decisions"], record["validation"]
    assert validation["passed"], validation["checks"]
    assert decisions["base_precision"] == "int8-dynamic" and decisions["weight_bits"] == 8
    # every block linear and the pooler; not the head
    assert decisions["quantized_linears"] == len(tiny_bert.modules()) + 1
    for name in TINY_RANKS:
        m = validation["metrics"][name]
        assert m["label_agreement"] >= 0.99 and 1e-3 < m["max_abs_logit"] < 0.5, name
    modules = tiny_bert.modules()
    expected = largest_ranks(list(TINY_RANKS.values()), modules)
    assert decisions["rank_bounds"] == expected and expected[modules[-1]] == 1
    assert expected[modules[-2]] == TINY_RANKS["narrow"][modules[-2]]  # wide does not adapt it
