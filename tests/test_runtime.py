"""On-device A/B swapping (loradeploy.runtime): every arm answers with its own adapter's
validated outputs, in every runtime; concurrent requests with swaps in between never get
another arm's adapter; mismatched adapters are refused while the arms keep serving; sticky
assignment is the same in every process."""

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loradeploy import runtime
from loradeploy.cli import main
from loradeploy.errors import BaseModelError, LoradeployError
from loradeploy.job import AdapterSpec
from tests.support.cli import main_bad_input
from tests.support.paths import EXAMPLE_ADAPTERS
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters as export
from tests.support.serving import serve_with_arm_swaps

SAME_ATOL = 1e-5  # one runtime, same inputs: the served session and one opened as validation opens it
N_TEXTS = 32


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from loradeploy.evaldata import DEFAULT_EVAL, load_eval

    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join(DEFAULT_EVAL.read_text().splitlines()[:N_TEXTS]) + "\n")
    return path, load_eval(path).texts


@pytest.fixture(scope="module")
def onnx_art(tmp_path_factory, texts):
    """MiniLM on onnxruntime with three adapters of different methods and ranks."""
    folder = tmp_path_factory.mktemp("onnx")
    names = ["sora", "increlora", "blora"]
    record = export("minilm", [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in names],
                    str(quick_profile(folder, "onnx-cpu")), folder / "art", mode="swappable", eval_path=texts[0])
    assert record["validation"]["passed"]
    return folder / "art"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _reference(got: dict[str, np.ndarray], texts, label_agreement_min: float, max_abs_logit: float | None):
    """Each adapter's outputs vs the PyTorch fp32 reference (base + adapter as trained) that
    validation holds the artifact to, within the profile's budgets."""
    from loradeploy.adapters import read_adapter
    from loradeploy.base import load_tokenizer, load_torch_model, resolve_base
    from loradeploy.ir import Task
    from loradeploy.reference import reference_outputs

    base_dir = resolve_base("minilm")
    model = load_torch_model(base_dir, Task.SEQUENCE_CLASSIFICATION, 2)
    for name, outputs in got.items():
        ref = reference_outputs(model, read_adapter(EXAMPLE_ADAPTERS / name), Task.SEQUENCE_CLASSIFICATION,
                                load_tokenizer(base_dir), texts)
        assert (outputs.argmax(-1) == ref.argmax(-1)).mean() >= label_agreement_min, name
        if max_abs_logit is not None:
            assert np.abs(outputs - ref).max() <= max_abs_logit, name


def _serve_texts(session, router, texts, validated, names):
    """Route every text; each answer equals the validated runner's for the arm's adapter.
    Returns every adapter's outputs per text (for the reference)."""
    got = {n: [] for n in names}
    for i, text in enumerate(texts):
        request = session.encode([text])
        routed = router.run(f"user-{i}", request)
        own = next(n for n in names if session.info(n).fingerprint == routed.result.fingerprint)
        assert np.abs(routed.outputs - validated.run(request, own).outputs).max() <= SAME_ATOL
        for n in names:
            got[n].append(session.run(request, n).outputs)
    return {n: np.concatenate(v) for n, v in got.items()}


def test_onnx_arms_equal_their_validated_reference(onnx_art, texts):
    validated = runtime.open(onnx_art)  # as validation opens it, apart from the served session
    session = runtime.open(onnx_art)
    router = runtime.ABRouter(session, {"a": onnx_art / "adapters" / "sora.onnx_adapter",
                                        "b": onnx_art / "adapters" / "increlora.onnx_adapter", "c": "blora"})
    got = _serve_texts(session, router, texts[1], validated, ["sora", "increlora", "blora"])
    snap = router.snapshot()
    assert snap["requests"] == len(texts[1]) and all(a["requests"] > 0 for a in snap["arms"].values())
    _reference(got, texts[1], 1.0, 1e-3)  # the onnx-cpu budgets
    session.close()


def _stress(art: Path, threads: int, per_thread: int, swap_every: int | None = None) -> dict:
    """``threads`` callers serve ``per_thread`` requests each while a swapper replaces both arms'
    adapters over and over; every answer is checked against the outputs of the adapter the
    arm held at the generation the request was routed to.

    ``swap_every=None``: the swapper swaps every 20 ms and samples RSS (timing-dependent: the
    slow tier). ``swap_every=N``: no timing: at most N requests start between two swaps (the
    requests wait for the swap, which may overlap the last ones still running), so there are
    exactly ``threads * per_thread // N`` swaps."""
    session = runtime.open(art, threads=1)  # the artifact's own three adapters, for the expectations
    words = "good bad fine awful great poor nice dull".split()
    requests = [session.encode([" ".join(words[j % 8] for j in range(i, i + 1 + i % 6))]) for i in range(48)]
    expected = {n: [session.run(r, n).outputs for r in requests] for n in session.adapters}
    by_fp = {session.info(n).fingerprint: n for n in session.adapters}
    for a in expected:
        for b in expected:
            if a < b:
                assert min(np.abs(x - y).max() for x, y in zip(expected[a], expected[b])) > 100 * SAME_ATOL
    pools = {"a": ["sora", "blora"], "b": ["increlora"]}
    path = {n: art / "adapters" / f"{n}.onnx_adapter" for n in session.adapters}
    router = runtime.ABRouter(session, {"a": path["sora"], "b": path["increlora"]}, weights=[60, 40])
    generations = {("a", 0): "sora", ("b", 0): "increlora"}
    current = {"a": 0, "b": 0}  # each arm's latest generation, as this test's swapper counts them
    failures, done, started, swaps, stop = [], [0], [0], [0], [False]
    cond = threading.Condition()  # guards generations, done, started, swaps, stop
    total = threads * per_thread

    def admitted() -> bool:  # gated mode: wait until this request's swap window is open
        if swap_every is None:
            return True
        with cond:
            if not cond.wait_for(lambda: stop[0] or started[0] < (swaps[0] + 1) * swap_every, timeout=120):
                failures.append("a request waited 120 s for a swap")
                return False
            started[0] += 1
            cond.notify_all()
            return True

    def serve(t: int):
        for k in range(per_thread):
            if not admitted():
                return
            i = (t * 7919 + k) % len(requests)
            routed = router.run(f"user-{t}-{k % 97}", requests[i])
            name = by_fp.get(routed.result.fingerprint)
            with cond:
                want = generations.get((routed.arm, routed.generation))
            if name != want or name not in pools[routed.arm] or not np.allclose(
                    routed.outputs, expected[name][i], rtol=0, atol=SAME_ATOL):
                failures.append((routed.arm, routed.generation, name, want))
            with cond:
                done[0] += 1

    def swap():
        arm = "ab"[swaps[0] % 2]
        pool = pools[arm]
        new = pool[(swaps[0] // 2 + 1) % len(pool)]
        current[arm] += 1
        with cond:  # recorded before the swap can serve anything
            generations[(arm, current[arm])] = new
        info = router.replace_arm(arm, path[new])
        if info["generation"] != current[arm]:
            failures.append(("replace_arm", arm, info["generation"], current[arm]))
        with cond:
            swaps[0] += 1
            cond.notify_all()

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    rss, baseline = [], None
    try:
        if swap_every is None:
            while any(w.is_alive() for w in workers):
                swap()
                if baseline is None and done[0] >= total // 5:  # warm-up: the first 20% of requests
                    baseline = rss_mb()
                elif baseline is not None:
                    rss.append(rss_mb())
                time.sleep(0.02)
        else:
            while swaps[0] < total // swap_every:
                with cond:  # the window is full: every request of it has started
                    if not cond.wait_for(lambda: started[0] >= (swaps[0] + 1) * swap_every, timeout=120):
                        failures.append("the swapper waited 120 s for requests")
                        break
                swap()
    finally:
        with cond:  # let every waiting request through (if the swapper stopped early)
            stop[0] = True
            cond.notify_all()
        for w in workers:
            w.join()
    seconds = time.perf_counter() - t0
    snap = router.snapshot()
    session.close()
    return {"failures": failures, "swaps": swaps[0], "baseline": baseline, "rss": rss, "snap": snap,
            "seconds": seconds, "total": total}


def _check_answers(result):
    """What holds whatever the timing: every answer from its arm's adapter at its generation,
    every request counted, none failed."""
    snap = result["snap"]
    assert result["failures"] == []
    assert snap["requests"] == result["total"] and all(a["errors"] == 0 for a in snap["arms"].values())


def test_onnx_requests_with_swaps_between_them(onnx_art):
    """4 threads × 100 requests, both arms swapped after every 20 requests started (no timing):
    0 answers from another arm's adapter (nor from another generation's)."""
    result = _stress(onnx_art, threads=4, per_thread=100, swap_every=20)
    _check_answers(result)
    assert result["swaps"] == 400 // 20
    arms = result["snap"]["arms"]
    assert arms["a"]["generation"] == 10 and arms["b"]["generation"] == 10
    # 11 generations per arm, each lasting 40 started requests (60/40 split): nearly all serve some
    assert len(arms["a"]["served_by"]) >= 8 and len(arms["b"]["served_by"]) >= 8


def _check_stress(result):
    rss, baseline = result["rss"], result["baseline"]
    print(f"\n{result['total']} requests in {result['seconds']:.1f} s ({result['total'] / result['seconds']:.0f}/s), "
          f"{result['swaps']} swaps, RSS after warm-up {baseline:.1f} MB, max {max(rss):.1f} MB "
          f"(+{max(rss) / baseline - 1:.2%}), samples {len(rss)}")
    _check_answers(result)
    assert result["swaps"] >= 50 and len(rss) >= 10
    assert max(rss) <= 1.05 * baseline
    served_a = result["snap"]["arms"]["a"]["served_by"]
    assert len(served_a) > 5  # the swaps really interleaved with the requests


@pytest.mark.slow
def test_onnx_8_threads_10k_requests_with_swaps(onnx_art):
    """8 threads × 1,280 = 10,240 requests, both arms swapped every few ms: 0 answers from
    another arm's adapter (nor from another generation's), RSS within 5% after warm-up."""
    _check_stress(_stress(onnx_art, threads=8, per_thread=1280))


def _artifact_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest, dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_mismatched_adapters_refused_while_arms_serve(onnx_art, tmp_path):
    from loradeploy.fsutil import sha256_file

    session = runtime.open(onnx_art)
    router = runtime.ABRouter(session, {"a": "sora", "b": "increlora"})
    request = session.encode(["The staff were lovely."])
    before = {arm: session.run(request, router.adapter(arm)).outputs for arm in ("a", "b")}
    stop, served, errors = threading.Event(), [0], []

    def serve():
        while not stop.is_set():
            for key in ("k1", "k2", "k3", "k4"):
                try:
                    routed = router.run(key, request)
                    assert np.array_equal(routed.outputs, before[routed.arm])
                    served[0] += 1
                except Exception as e:  # noqa: BLE001 — any failure of a serving arm is the bug
                    errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()

    def other_base(m, d):
        m["base"]["weights"][0]["sha256"] = "0" * 64
    other = _artifact_copy(onnx_art, tmp_path / "other-base", other_base)

    def bogus(m, d):  # right provenance, tensors that fit nothing in the graph
        from loradeploy.plugins.onnxruntime.adapter_tensors import write_adapter_file

        write_adapter_file({"bert.encoder.layer.0.attention.self.query.lora_A": np.zeros((512, 4), np.float32),
                            "no.such.input": np.zeros((2, 2), np.float32)}, d / "adapters" / "bogus.onnx_adapter")
        f = d / "adapters" / "bogus.onnx_adapter"
        m["adapters"].append({"name": "bogus", "method": "sora", "sources": [], "file": "adapters/bogus.onnx_adapter"})
        m["files"].append({"path": "adapters/bogus.onnx_adapter", "sha256": sha256_file(f), "bytes": f.stat().st_size})
    shapes = _artifact_copy(onnx_art, tmp_path / "bogus", bogus)
    changed = _artifact_copy(onnx_art, tmp_path / "changed", lambda m, d: None)
    (changed / "adapters" / "sora.onnx_adapter").write_bytes((onnx_art / "adapters" / "blora.onnx_adapter").read_bytes())
    loose = tmp_path / "loose.onnx_adapter"
    shutil.copy(onnx_art / "adapters" / "sora.onnx_adapter", loose)
    cases = [(other / "adapters" / "sora.onnx_adapter", "exported for base minilm (weights sha256 000000000000)"),
             (shapes / "adapters" / "bogus.onnx_adapter", "does not fit this session's graph inputs"),
             (changed / "adapters" / "sora.onnx_adapter", "changed since export"),
             (loose, "not inside the adapters/ folder of an exported artifact")]
    try:
        for path, message in cases:
            with pytest.raises(BaseModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
                router.replace_arm("a", path)
            assert router.adapter("a") == "sora"
        with pytest.raises(BaseModelError, match=r"query\.lora_A is tensor\(float\) \[512, 4\], the graph takes "
                                                 r"tensor\(float\) \[384, 'rank_.*\(and 1 more\)"):
            session.load_adapter("x", shapes / "adapters" / "bogus.onnx_adapter")
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and served[0] > 0
    assert session.adapters == ("sora", "increlora", "blora")
    assert np.array_equal(router.run("k1", request).outputs, before[router.assign("k1")])
    session.close()


def test_sticky_assignment_is_stable():
    """sha256 of experiment NUL key: fixed answers, the same in a fresh process, and the
    traffic split follows the weights."""
    from loradeploy.runtime.router import _cuts, assign

    keys = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "user-1", "user-2", "user-3", "user-42"]
    assert "".join("ab"[assign(k, _cuts(["a", "b"], [50, 50]))] for k in keys) == "aaababbbabba"
    assert "".join("abc"[assign(k, _cuts(list("abc"), [70, 20, 10]), "exp2")] for k in keys) == "aaacabaaaaaa"
    u = int.from_bytes(hashlib.sha256(b"ab\0dave").digest()[:8], "big") / 2 ** 64
    assert u >= 0.5  # dave → b under 50/50, from the documented formula alone
    code = ("from loradeploy.runtime.router import _cuts, assign; import sys; "
            f"print(''.join('ab'[assign(k, _cuts(['a','b'], [50, 50]))] for k in {keys!r}))")
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "aaababbbabba"
    share = sum(assign(f"u{i}", _cuts(["a", "b"], [70, 30])) == 0 for i in range(20_000)) / 20_000
    assert abs(share - 0.7) < 0.01


def test_router_rejects_bad_weights(onnx_art):
    session = runtime.open(onnx_art)
    with pytest.raises(LoradeployError, match="one non-negative weight per arm"):
        runtime.ABRouter(session, {"a": "sora", "b": "blora"}, weights=[1, -1])
    with pytest.raises(LoradeployError, match="not loaded"):
        session.run(session.encode(["x"]), "nope")
    session.close()


def test_ab_command(onnx_art, texts, capsys, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(f"user-{i % 5}" for i in range(N_TEXTS)) + "\n")
    code = main(["ab", str(onnx_art), "--arm", f"a={onnx_art / 'adapters' / 'sora.onnx_adapter'}", "--arm", "b=increlora",
                 "--weights", "50,50", "--inputs", str(texts[0]), "--keys", str(keys), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["requests"] == N_TEXTS
    arms = record["router"]["arms"]
    assert sum(a["requests"] for a in arms.values()) == N_TEXTS
    assert all(a["latency_ms"]["p95"] >= a["latency_ms"]["p50"] > 0 for a in arms.values() if a["requests"])
    # agreement: the share of inputs on which sora and increlora give the same top-1 label
    session = runtime.open(onnx_art)
    requests = [session.encode([t]) for t in texts[1]]
    same = [int(session.run(r, "sora").outputs.argmax()) == int(session.run(r, "increlora").outputs.argmax())
            for r in requests]
    session.close()
    assert record["agreement"] == pytest.approx(sum(same) / N_TEXTS)
    # sticky by key: each arm serves exactly the inputs whose key the documented formula sends to it
    from loradeploy.runtime.router import assign

    user_keys = keys.read_text().split()
    assert {n: a["requests"] for n, a in arms.items()} == {
        n: sum(assign(k, [0.5, 1.0]) == i for k in user_keys) for i, n in enumerate("ab")}
    # a path keeps its own error; a name lists the adapters (test_router)
    main_bad_input(capsys, ["ab", str(onnx_art), "--arm", "a=sora", "--arm", "b=/nonexistent.onnx_adapter", "--inputs",
                            str(texts[0])], "/nonexistent.onnx_adapter: no such adapter file or folder")
    assert main(["ab", str(onnx_art), "--arm", "a=-", "--arm", "b=blora", "--inputs", str(texts[0])]) == 0
    out = capsys.readouterr().out
    assert "arms agree (same top-1)" in out and "(base)" in out


# -- llama.cpp and bitsandbytes (slow: Gemma export, bnb quantization) ------------------------

@pytest.mark.slow
def test_gguf_arms_equal_validated_runner_across_threads(gemma_pair_art, onnx_art):
    """Gemma 3 270M: every arm's last-token logits equal the validated runner's for its
    adapter, served by 4 threads over 2 contexts with swaps in between."""
    art, record = gemma_pair_art
    assert record["validation"]["passed"]
    gguf_serving_checks(art, onnx_art)


def gguf_serving_checks(art: Path, onnx_art: Path):
    validated = runtime.open(art, workers=1)  # as validation opens it, apart from the served session
    session = runtime.open(art, workers=2)
    sentences = ["The soup was not good, but the staff were lovely.", "I would buy this camera again.",
                 "Hardly worth the price, sadly.", "The hotel room was"]
    requests = [session.encode([s]) for s in sentences]
    expected = {n: [validated.logits([int(t) for t in r["input_ids"][0]], n)[-1] for r in requests]
                for n in (None, "sora", "increlora")}
    for e_s, e_i, e_b in zip(expected["sora"], expected["increlora"], expected[None]):
        assert min(np.abs(e_s - e_i).max(), np.abs(e_s - e_b).max(), np.abs(e_i - e_b).max()) > 0.1
    by_fp = {session.info(n).fingerprint: n for n in session.adapters}
    router = runtime.ABRouter(session, {"a": art / "adapters" / "sora.gguf", "b": art / "adapters" / "increlora.gguf",
                                        "base": None})
    failures, swaps = serve_with_arm_swaps(
        router, requests, expected, by_fp, {"a": "sora", "b": "increlora", "base": None},
        {"a": art / "adapters" / "sora.gguf", "b": art / "adapters" / "increlora.gguf"}, threads=4, per_thread=12,
        atol=1e-3)
    assert failures == [] and swaps > 2
    assert router.snapshot()["requests"] == 48
    # a MiniLM adapter (onnxruntime) is refused; the arm keeps serving its adapter
    with pytest.raises(BaseModelError, match="an adapter for onnxruntime, this session runs llama.cpp"):
        router.replace_arm("a", onnx_art / "adapters" / "sora.onnx_adapter")
    key_a = next(k for k in (f"k{i}" for i in range(100)) if router.assign(k) == "a")
    routed = router.run(key_a, requests[0])
    assert np.abs(routed.outputs[0] - expected[by_fp[routed.result.fingerprint]][0]).max() <= 1e-3
    session.close()


@pytest.mark.slow
def test_bnb_arms_equal_validated_runner_and_reference(tmp_path, texts):
    names = ["sora", "increlora"]
    record = export("minilm", [AdapterSpec(n, EXAMPLE_ADAPTERS / n) for n in names],
                    str(quick_profile(tmp_path, "bnb-nf4")), tmp_path / "art", mode="swappable", eval_path=texts[0])
    assert record["validation"]["passed"]
    art = tmp_path / "art"
    validated = runtime.open(art)  # as validation opens it, apart from the served session
    session = runtime.open(art)
    router = runtime.ABRouter(session, {"a": "sora", "b": "increlora"})
    got = _serve_texts(session, router, texts[1], validated, names)
    _reference(got, texts[1], 0.98, None)  # the bnb-nf4 budget
    # loading after serving rebuilds the model (see plugins/bitsandbytes/session.py): every output unchanged
    request = session.encode([texts[1][0]])
    router.replace_arm("a", art / "adapters" / "increlora")
    key_a = next(k for k in (f"k{i}" for i in range(100)) if router.assign(k) == "a")
    assert np.abs(router.run(key_a, request).outputs - got["increlora"][:1]).max() <= SAME_ATOL
    assert np.abs(session.run(request, "sora").outputs - got["sora"][:1]).max() <= SAME_ATOL
    base = validated.run(request).outputs
    assert np.abs(session.run(request).outputs - base).max() <= SAME_ATOL
    with pytest.raises(BaseModelError, match="not inside the adapters/ folder"):
        session.load_adapter("raw", EXAMPLE_ADAPTERS / "sora")  # a training checkpoint, not exported
    session.close()
