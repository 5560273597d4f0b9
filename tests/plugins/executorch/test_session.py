"""The ExecuTorch session: adapters swapped on one loaded program by feeding tensors (each
answering like its fp32 PyTorch reference, from several threads at once), an adapter of another
artifact of the base (fixed rank bounds leave headroom for it), and the bad inputs: a rank above
its module's bound, factors of two ranks, another base, corrupt files."""

import dataclasses
import shutil
import threading

import numpy as np
import pytest

from loradeploy.job import AdapterSpec
from tests.plugins.executorch.conftest import ADAPTERS
from tests.support.exports import export_adapters
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.tamper import flip_byte

pytestmark = pytest.mark.slow
ATOL = 1e-4


@pytest.fixture(scope="module")
def references():
    """fp32 PyTorch outputs of each example adapter on a few texts (one long)."""
    from loradeploy.base import load_tokenizer, load_torch_model, resolve_base
    from loradeploy.evaldata import load_eval
    from loradeploy.ir import Task
    from loradeploy.job import AdapterInputs, load_entries
    from loradeploy.reference import reference_outputs

    texts = load_eval(None).texts[30:35] + ["a much longer review that goes on " * 30]
    base_dir = resolve_base("minilm")
    base = load_torch_model(base_dir, Task.SEQUENCE_CLASSIFICATION, 2)
    entries = load_entries(AdapterInputs.of([AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in ADAPTERS]))
    tokenizer = load_tokenizer(base_dir)
    return texts, {e.name: reference_outputs(base, e.pruned, Task.SEQUENCE_CLASSIFICATION, tokenizer, texts)
                   for e in entries}


def test_adapters_swap_on_one_program_by_feeding_tensors(et_swappable, references):
    from loradeploy import runtime

    folder, _ = et_swappable
    texts, expected = references
    with runtime.open(folder, adapters=False, threads=1) as session:
        program, method = session.program, session.method
        inputs = session.encode(texts)
        assert inputs["input_ids"].shape[1] == 128  # the long text fills the sequence axis
        for name in ADAPTERS:
            session.load_adapter(name, folder / "adapters" / f"{name}.ptd")
        got = {name: session.run(inputs, name).outputs for name in (*ADAPTERS, ADAPTERS[0])}
        session.unload_adapter(ADAPTERS[0])
        with pytest.raises(Exception, match="is not loaded"):
            session.run(inputs, ADAPTERS[0])
        assert session.program is program and session.method is method  # never reloaded
    for name in ADAPTERS:
        assert np.abs(got[name] - expected[name]).max() <= ATOL, name
        assert (got[name].argmax(1) == expected[name].argmax(1)).all()
    assert np.abs(expected["sora"] - expected["increlora"]).max() > 1e-2  # the swap changes the answer


def test_threads_swapping_adapters_each_get_their_adapters_answer(et_swappable, references):
    from loradeploy import runtime

    folder, _ = et_swappable
    texts, expected = references
    failures, calls = [], []
    with runtime.open(folder, threads=1) as session:
        inputs = session.encode(texts[:3])

        def worker(k):
            for i in range(6):
                name = ADAPTERS[(k + i) % 2]
                result = session.run(inputs, name)
                calls.append(name)
                if result.adapter != name or np.abs(result.outputs - expected[name][:3]).max() > ATOL:
                    failures.append((k, i, name))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 24 and not failures, failures


def test_an_adapter_of_another_artifact_loads_into_fixed_bounds(et_swappable, et_eval, et_profile, references,
                                                               tmp_path):
    """increlora exported alone with fixed_rank_bound: every slot is bounded by rank_bound 16, so
    sora's file from the two-adapter artifact loads (by default layer 0's intermediate dense
    would be bounded by increlora's rank 7 there, and sora has rank 8)."""
    import yaml

    from loradeploy import runtime
    from loradeploy.plugins.executorch.tensor_data import read_tensor_data

    folder, _ = et_swappable
    texts, expected = references
    module = "bert.encoder.layer.0.intermediate.dense"
    ranks = {n: read_tensor_data(folder / "adapters" / f"{n}.ptd")[0][f"{module}.lora_A"].shape[1] for n in ADAPTERS}
    assert ranks == {"sora": 8, "increlora": 7}
    profile = yaml.safe_load(et_profile.read_text())
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump({**profile, "fixed_rank_bound": True}))
    other = tmp_path / "increlora-alone"
    record = export_adapters("minilm", [AdapterSpec("increlora", EXAMPLE_ADAPTERS / "increlora")], fixed, other,
                             mode="swappable", eval_path=et_eval)
    assert record["decisions"]["fixed_rank_bound"] is True
    assert set(record["decisions"]["rank_bounds"].values()) == {16} and len(record["decisions"]["rank_bounds"]) == 36
    with runtime.open(other, threads=1) as session:
        session.load_adapter("sora", folder / "adapters" / "sora.ptd")
        out = session.run(session.encode(texts), "sora").outputs
        assert session.info("sora").artifact == folder.absolute()
    assert np.abs(out - expected["sora"]).max() <= ATOL


def test_rank_above_its_modules_bound_and_another_base_are_refused_naming_them(et_swappable, tmp_path):
    """layer 2's query is bounded by 7 (sora's rank there; increlora's is 1): rank 8 is refused,
    naming the module and its bound, though 8 is below the profile's rank_bound 16."""
    import json

    from loradeploy import manifest as mf
    from loradeploy import runtime
    from loradeploy.errors import BaseModelError
    from loradeploy.plugins.executorch.session import adapter_problems
    from loradeploy.plugins.executorch.tensor_data import read_tensor_data, write_tensor_data

    folder, _ = et_swappable
    config = json.loads((folder / "executorch.json").read_text())
    tensors, meta = read_tensor_data(folder / "adapters" / "sora.ptd")
    module = "bert.encoder.layer.2.attention.self.query"
    assert {i["name"]: i["shape"] for i in config["inputs"]}[f"{module}.lora_A"] == [384, 7]
    wide = dict(tensors, **{f"{module}.lora_A": np.ones((384, 8), np.float32),
                            f"{module}.lora_B": np.ones((8, 384), np.float32)})
    assert adapter_problems(wide, meta, config) == [
        f"module {module} has rank 8, above the program's rank bound 7 for it"] * 2
    assert adapter_problems(dict(tensors, **{f"{module}.lora_B": np.ones((3, 384), np.float32)}), meta, config) == [
        f"module {module}: its lora_A has rank 7, its lora_B rank 3"]
    assert adapter_problems({k: v for k, v in tensors.items() if k != f"{module}.lora_B"}, meta, config) == [
        f"module {module} has lora_A but not lora_B"]
    assert "names base" in adapter_problems(tensors, {**meta, "base_fingerprint": "0" * 64}, config)[0]
    # the same through load_adapter: a copy of the artifact whose sora.ptd has rank 8 in that module
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    fields = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    write_tensor_data(wide, copy / "adapters" / "sora.ptd", fields)
    mf.write(copy, dataclasses.replace(mf.read(copy), files=mf.file_entries(copy)))
    with runtime.open(copy, adapters=False, threads=1) as session:
        with pytest.raises(BaseModelError, match=f"sora.ptd: .*module {module} has rank 8, above the program's "
                                                 "rank bound 7 for it"):
            session.load_adapter("sora", copy / "adapters" / "sora.ptd")
        assert session.adapters == ()


@pytest.mark.parametrize("rel,offset", [("model.pte", 4), ("adapters/sora.ptd", 8), ("base.ptd", 8)])
def test_a_corrupt_program_or_tensor_file_fails_verify(et_swappable, tmp_path, capsys, rel, offset):
    """The byte flipped in the file's magic: verify names it (sha256), and the runtime's own check
    of its format (verify's FILE_CHECKS) refuses it too."""
    import json

    from loradeploy.cli import main
    from loradeploy.plugins.executorch.session import ExecuTorchSession

    folder, _ = et_swappable
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    check = ExecuTorchSession.FILE_CHECKS["." + rel.rsplit(".", 1)[1]]
    assert check(copy / rel) is None
    flip_byte(copy / rel, offset)
    with pytest.raises(Exception, match=rel.rsplit("/", 1)[-1]):
        check(copy / rel)
    capsys.readouterr()
    assert main(["verify", str(copy), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p["file"] for p in problems] == [rel] and "sha256 differs" in problems[0]["problem"]
