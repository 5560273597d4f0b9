"""Fuzzed inputs (issue 13): hypothesis damages valid seed files of every kind loradeploy reads
— safetensors, pickles (torch.save zip and legacy), GGUF, .onnx_adapter, ONNX and the JSON files
(adapter_config.json, lora_config.json, config.json, manifest.json, tokenizer JSON) — by
truncations, bit flips, edited headers and lengths, and runs ``inspect``/``prune`` (readers) or
``verify`` on the result, in this process through ``loradeploy.cli.main``.

Every case must exit 0, 1 (verify, naming the failing file on stdout) or 2 with exactly one
``error:`` line on stderr (counting native writes to fd 2, warning log records and Python
warnings), print no traceback, finish within 10 s, and write nothing outside its temporary
folder. The fast tier runs 338 cases, the slow tier 2,036 more (other examples): each test
checks that all of its cases ran. Runs are seeded, so CI sees the same cases every time.
Counts by file kind and outcome are printed at the end of the module (under ``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import pytest
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loradeploy import manifest as mf
from tests.support import fuzzkit as fk

READER_KINDS = [
    "sora model.safetensors", "sora head.safetensors", "sora lora_config.json", "sora pytorch_model.bin (zip)",
    "sora pytorch_model.bin (legacy pickle)", "increlora pytorch_model.bin", "increlora config.json",
    "blora adapter_model.safetensors", "blora adapter_config.json", "peft adapter_model.safetensors",
    "peft adapter_config.json", "adalora adapter_model.safetensors", "adalora adapter_config.json",
    "gguf given as adapter", "onnx_adapter given as adapter",
]
ARTIFACT_KINDS = ["manifest.json", "model.onnx", "onnx_adapter", "gguf", "safetensors", "adapter_config.json",
                  "tokenizer_config.json"]
REAL_KINDS = ["manifest.json", "onnx_adapter", "tokenizer_config.json", "model.onnx"]

FAST = {"reader": 16, "artifact": 14}  # 15·16 + 7·14 = 338 cases
SLOW = {"reader": 90, "artifact": 90, "real": 14}  # 1,350 + 630 + 56 = 2,036 cases


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


class _Short(dict):
    """Seeds with a short repr, for hypothesis' falsifying-example reports."""

    def __repr__(self):
        return f"<{len(self)} seeds>"


class _Root(type(Path())):
    def __repr__(self):
        return "<tmp>"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _Root(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def seeds(root):
    seeds = _Short(fk.build_reader_seeds(root / "seeds"))
    digests = {k: fk.tree_digest(s.folder) for k, s in seeds.items()}
    yield seeds
    for k, s in seeds.items():  # the cases worked on copies
        assert fk.tree_digest(s.folder) == digests[k], f"seed {k} was changed"


@pytest.fixture(scope="module")
def mini(root):
    art = fk.build_mini_artifact(root / "mini")
    digest = fk.tree_digest(art.folder)
    yield art
    assert fk.tree_digest(art.folder) == digest


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    for tier in fk.COUNTS:
        print(f"\n{tier} tier: cases run, by file kind and outcome\n" + fk.table(tier))
    print("wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in fk.TIMES.items()))


def _run_cases(n: int, name: str, case) -> None:
    """``case(data)`` on ``n`` hypothesis examples, the same ones every run for the same ``name``
    (a seed from it: each test and tier draws its own); fails unless all ``n`` ran."""
    ran = []

    @hypothesis.seed(zlib.crc32(name.encode()))
    @_settings(n)
    @given(data=st.data())
    def each(data):
        case(data)
        ran.append(True)

    each()
    assert len(ran) == n, f"{len(ran)} of {n} cases ran"


def _timed(name):
    """Add the wall time of a (parametrized) test to fk.TIMES[name]."""
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            fk.TIMES[name] = fk.TIMES.get(name, 0.0) + time.perf_counter() - self.t
    return _T()


# --- readers: inspect / prune on a damaged checkpoint ---------------------------------------

def reader_case(seeds, kind, data, tier, root):
    seed = seeds[kind]
    original = (seed.folder / seed.file).read_bytes()
    strategy = fk.mutation_for(seed.file) or (fk.torch_zip_mutation if original[:2] == b"PK" else fk.byte_mutation)
    desc, new = data.draw(strategy(original).map(fk.Mutated), label="mutation")
    command = data.draw(st.sampled_from(["inspect", "inspect", "prune"]), label="command")
    as_json = data.draw(st.booleans(), label="json")
    work = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    try:
        case, cwd, out = work / "case", work / "cwd", work / "out"
        shutil.copytree(seed.folder, case)
        (case / seed.file).write_bytes(new)
        cwd.mkdir()
        before = fk.tree_digest(case)
        argv = [command, str(case / seed.target)] + (["-o", str(out)] if command == "prune" else [])
        res = fk.run_cli(argv + (["--json"] if as_json else []), cwd)
        outcome = fk.check_result(res, kind, tier, (0, 2), f"{command} after {desc}")
        if new == original and "given as adapter" not in kind:
            assert res.code == 0, f"[{kind}] the unchanged seed failed: {res.err_lines}"
        assert fk.tree_digest(case) == before, f"[{kind}] {desc}: the input folder was changed"
        assert list(cwd.iterdir()) == [], f"[{kind}] {desc}: files written to the working directory"
        written = sorted(p.name for p in work.iterdir())
        expected = ["case", "cwd"] + (["out"] if command == "prune" and res.code == 0 else [])
        assert written == expected, f"[{kind}] {desc}: {written} beside the input, expected {expected}"
        if command == "prune" and res.code == 0:
            assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                       "prune_report.json"}
        if as_json and res.code == 0:
            json.loads(res.out)
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("kind", READER_KINDS)
def test_fuzz_readers(seeds, root, kind):
    def case(data):
        with _timed("fast readers"):
            reader_case(seeds, kind, data, "fast", root)

    _run_cases(FAST["reader"], f"fast readers {kind}", case)


@pytest.mark.slow
@pytest.mark.parametrize("kind", READER_KINDS)
def test_fuzz_readers_slow(seeds, root, kind):
    def case(data):
        with _timed("slow readers"):
            reader_case(seeds, kind, data, "slow", root)

    _run_cases(SLOW["reader"], f"slow readers {kind}", case)


# --- verify: a damaged artifact ------------------------------------------------------------

def _copy_artifact(src: Path, dst: Path) -> None:
    """Hard links (a real artifact's model.onnx is 90 MB); a damaged file is replaced, never
    written through its link."""
    shutil.copytree(src, dst, copy_function=os.link)


def _relist(art: Path, rel: str) -> None:
    """A consistent forgery: the manifest's sha256 and size of ``rel`` as the file is now (and the
    manifest's own sha256 set again)."""
    import hashlib

    def sha256_file(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    m = json.loads((art / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == rel:
            f["sha256"], f["bytes"] = sha256_file(art / rel), (art / rel).stat().st_size
    (art / "manifest.json").unlink()
    (art / "manifest.json").write_text(json.dumps(mf.sealed(m)))


def verify_case(source: fk.Artifact | Path, kind, rel, data, tier, root, load: bool, prefix: str = ""):
    src = source.folder if isinstance(source, fk.Artifact) else source
    original = (src / rel).read_bytes()
    strategy = fk.mutation_for(rel) or fk.byte_mutation
    desc, new = data.draw(strategy(original).map(fk.Mutated), label="mutation")
    relist = kind != "manifest.json" and data.draw(st.booleans(), label="relist")
    as_json = data.draw(st.booleans(), label="json")
    work = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    try:
        art, cwd = work / "art", work / "cwd"
        _copy_artifact(src, art)
        (art / rel).unlink()
        (art / rel).write_bytes(new)
        if relist:
            _relist(art, rel)
        cwd.mkdir()
        before = fk.tree_digest(art)
        argv = ["verify", str(art)] + ([] if load else ["--no-load"]) + (["--json"] if as_json else [])
        res = fk.run_cli(argv, cwd)
        label = f"{prefix}{kind}{' (load)' if load else ''}"
        what = f"verify{'' if load else ' --no-load'} after {desc}{' (relisted)' if relist else ''}"
        outcome = fk.check_result(res, label, tier, (0, 1, 2), what)
        assert fk.tree_digest(art) == before, f"[{kind}] {what}: verify changed the artifact"
        assert list(cwd.iterdir()) == [] and sorted(p.name for p in work.iterdir()) == ["art", "cwd"], \
            f"[{kind}] {what}: verify wrote files"
        if res.code in (0, 1):
            if as_json:
                record = json.loads(res.out)
                named = [p["file"] for p in record["problems"]]
                assert record["ok"] == (res.code == 0)
            else:
                named = [line.split(" ", 2)[1].rstrip(":") for line in res.out.splitlines() if line.startswith("FAIL ")]
            assert (res.code == 1) == bool(named), f"[{kind}] {what}: exit {res.code} but problems {named}\n{res.out}"
        if kind != "manifest.json" and new != original:
            if not relist:  # its size or sha256 differs from the manifest
                assert res.code == 1 and rel in named, f"[{kind}] {what}: exit {res.code}, named {res.code == 1 and named}"
            elif res.code == 1:
                assert set(named) <= {rel, "."}, f"[{kind}] {what}: named {named}"
        if new == original and kind != "manifest.json":
            assert res.code == 0, f"[{kind}] {what}: the unchanged artifact failed"
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_fuzz_verify(mini, root, kind):
    def case(data):
        with _timed("fast verify"):
            load = data.draw(st.integers(0, 3), label="load") == 0
            verify_case(mini, kind, mini.files[kind], data, "fast", root, load)

    _run_cases(FAST["artifact"], f"fast verify {kind}", case)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_fuzz_verify_slow(mini, root, kind):
    def case(data):
        with _timed("slow verify"):
            load = data.draw(st.integers(0, 3), label="load") == 0
            verify_case(mini, kind, mini.files[kind], data, "slow", root, load)

    _run_cases(SLOW["artifact"], f"slow verify {kind}", case)


# --- verify: a damaged real export (MiniLM + the example SoRA adapter, onnx-cpu) -------------

@pytest.fixture(scope="module")
def real(root):
    """One exported swappable onnx-cpu artifact (short eval set, one timing run)."""
    import yaml

    from loradeploy.evaldata import DEFAULT_EVAL
    from loradeploy.profile import BUILTIN_DIR
    from tests.support.paths import EXAMPLE_ADAPTERS

    t = time.perf_counter()
    work = root / "real"
    work.mkdir()
    eval_file = work / "eval.jsonl"
    eval_file.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:16]) + "\n")
    data = yaml.safe_load((BUILTIN_DIR / "onnx-cpu.yaml").read_text())
    data.update({"warmup": 0, "runs": 1, "shapes": [{"batch": 1, "seq": 16}]})
    data["budgets"].pop("latency_p95_ms", None)
    profile = work / "onnx-cpu.yaml"
    profile.write_text(yaml.safe_dump(data))
    art = work / "art"
    res = fk.run_cli(["export", "--base", "minilm", "--adapter", f"sora={EXAMPLE_ADAPTERS / 'sora'}", "--target",
                      str(profile), "--eval", str(eval_file), "-o", str(art), "--json"], work, limit=None)
    assert res.code == 0 and res.exception is None, (res.code, res.err_lines, res.exception, res.out[-2000:])
    fk.TIMES["slow real export"] = time.perf_counter() - t
    digest = fk.tree_digest(art)
    yield art
    assert fk.tree_digest(art) == digest


REAL_FILES = {"manifest.json": "manifest.json", "onnx_adapter": "adapters/sora.onnx_adapter",
              "tokenizer_config.json": "tokenizer_config.json", "model.onnx": "model.onnx"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", REAL_KINDS)
def test_fuzz_verify_real_export(real, root, kind):
    def case(data):
        with _timed("slow verify real export"):
            load = kind != "model.onnx" or data.draw(st.integers(0, 3), label="load") == 0
            verify_case(real, kind, REAL_FILES[kind], data, "slow", root, load, prefix="onnx-cpu export ")

    _run_cases(SLOW["real"], f"slow verify real export {kind}", case)
