"""The A/B router's latency statistics (loradeploy.runtime.router), on a stand-in session and
a stand-in clock: each request "takes" a known number of milliseconds, so the reported p50/p95
are checked against numpy's quantiles of the same samples, within the histogram's stated
resolution (20 buckets per decade: the bucket's geometric middle is within ±6% of any value in
it). No model is loaded."""

from types import SimpleNamespace

import numpy as np
import pytest

from loradeploy.runtime import router as router_module
from loradeploy.runtime.router import ABRouter

RESOLUTION = 0.06


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _Session:
    """Serves every request in the next of ``latencies_ms`` (advancing the clock by it)."""

    runtime = "stand-in"
    adapters = ()

    def __init__(self, clock: _Clock):
        self.clock, self.latencies_ms = clock, []

    def run(self, inputs, adapter=None):
        self.clock.now += self.latencies_ms.pop(0) / 1e3
        return SimpleNamespace(outputs=np.zeros((1, 2), np.float32), adapter=adapter, fingerprint=None)


@pytest.fixture
def session(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(router_module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return _Session(clock)


def _serve(session, router, samples_ms, keys):
    session.latencies_ms = list(samples_ms)
    for key in keys:
        router.run(key, {})
    assert session.latencies_ms == []


def _numpy_quantile(samples, q):
    # the router reports the bucket of the ceil(q·n)-th smallest sample: numpy's inverted CDF
    return float(np.quantile(samples, q, method="inverted_cdf"))


@pytest.mark.parametrize("samples", [
    np.random.default_rng(0).lognormal(np.log(5.0), 0.6, 2000),  # a few ms, long right tail
    np.random.default_rng(1).uniform(0.05, 400.0, 1000),  # four decades
    np.concatenate([np.full(90, 1.3), np.full(10, 87.0)]),  # 90% fast, 10% slow: p95 is a slow one
], ids=["lognormal", "uniform", "bimodal"])
def test_p50_p95_within_the_histogram_resolution(session, samples):
    router = ABRouter(session, {"a": None})
    _serve(session, router, samples, [f"k{i}" for i in range(len(samples))])
    latency = router.snapshot()["arms"]["a"]["latency_ms"]
    for name, q in (("p50", 0.5), ("p95", 0.95)):
        want = _numpy_quantile(samples, q)
        assert latency[name] == pytest.approx(want, rel=RESOLUTION), name
    assert latency["mean"] == pytest.approx(samples.mean(), rel=1e-9)
    assert latency["max"] == pytest.approx(samples.max(), rel=1e-9)
    counts, _ = np.histogram(samples, bins=[0.0, *router_module.HIST_EDGES_MS, np.inf])
    assert sum(n for _, _, n in latency["histogram"]) == len(samples)
    assert [n for _, _, n in latency["histogram"]] == [int(c) for c in counts if c]


def test_bimodal_quantiles_pick_the_right_mode(session):
    """Not just close on average: p50 in the fast mode, p95 in the slow one, per arm."""
    router = ABRouter(session, {"a": None, "b": None})
    keys = [f"user-{i}" for i in range(400)]
    arms = [router.assign(k) for k in keys]
    # arm a: 1 ms for every request; arm b: 2 ms, and 100 ms for its last 10%
    b_total = arms.count("b")
    b_seen, samples = 0, []
    for arm in arms:
        if arm == "a":
            samples.append(1.0)
        else:
            b_seen += 1
            samples.append(100.0 if b_seen > 0.9 * b_total else 2.0)
    _serve(session, router, samples, keys)
    snap = router.snapshot()["arms"]
    assert snap["a"]["requests"] == arms.count("a") and snap["b"]["requests"] == b_total
    assert snap["a"]["latency_ms"]["p50"] == pytest.approx(1.0, rel=RESOLUTION)
    assert snap["a"]["latency_ms"]["p95"] == pytest.approx(1.0, rel=RESOLUTION)
    assert snap["b"]["latency_ms"]["p50"] == pytest.approx(2.0, rel=RESOLUTION)
    assert snap["b"]["latency_ms"]["p95"] == pytest.approx(100.0, rel=RESOLUTION)
    assert snap["b"]["latency_ms"]["max"] == pytest.approx(100.0)


def test_an_arm_without_requests_reports_no_latency(session):
    router = ABRouter(session, {"a": None, "b": None}, weights=[1, 0])
    _serve(session, router, [3.0] * 20, [f"k{i}" for i in range(20)])
    snap = router.snapshot()["arms"]
    assert snap["a"]["requests"] == 20 and snap["b"]["requests"] == 0
    assert snap["b"]["latency_ms"] == {"p50": None, "p95": None, "mean": None, "max": None, "histogram": []}
    assert snap["a"]["latency_ms"]["p50"] == pytest.approx(3.0, rel=RESOLUTION)


def test_an_arm_naming_no_adapter_lists_those_there_are(session, tmp_path, monkeypatch):
    """`ab --arm b=sorra`: neither an adapter of the artifact nor a file; the error says which
    adapters the artifact has (and the closest one)."""
    from loradeploy.errors import LoradeployError

    session.adapters = ("sora", "blora")
    session.info = lambda name: SimpleNamespace(fingerprint=f"fp-{name}")
    monkeypatch.chdir(tmp_path)  # no file named sorra here either
    with pytest.raises(LoradeployError) as e:
        ABRouter(session, {"a": "sora", "b": "sorra"})
    assert str(e.value) == ("arm 'b': 'sorra' is no adapter of this artifact (it has sora, blora) and no adapter file "
                            "or folder; did you mean 'sora'?")
    assert ABRouter(session, {"a": "sora", "b": None}).adapter("a") == "sora"  # a name it has is served as is
