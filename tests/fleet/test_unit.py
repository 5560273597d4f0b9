"""What a fleet worker keeps between units: the machine-wide timing lock and the latency process."""

import threading
import time

import pytest

from loradeploy.errors import LoradeployError
from loradeploy.fleet.unit import LatencyProcess, QuietMachine


def _quiet(path):
    q = QuietMachine()
    q.path = path
    return q


def test_timing_waits_until_no_other_unit_computes(tmp_path):
    lock = tmp_path / "quiet.lock"
    a, b = _quiet(lock), _quiet(lock)
    events = []
    b_computing, release_b = threading.Event(), threading.Event()

    def other_unit():
        with b.computing():
            b_computing.set()
            release_b.wait(10)
            events.append("b done computing")

    t = threading.Thread(target=other_unit)
    t.start()
    b_computing.wait(10)
    with a.computing():  # computing beside another unit: shared, no wait
        events.append("a computing")
        threading.Timer(0.5, release_b.set).start()
        t0 = time.monotonic()
        with a.timing():
            events.append("a timing")
            waited = time.monotonic() - t0
    t.join()
    assert events == ["a computing", "b done computing", "a timing"]
    assert waited >= 0.4


def test_a_unit_cannot_start_computing_while_another_times(tmp_path):
    lock = tmp_path / "quiet.lock"
    a, b = _quiet(lock), _quiet(lock)
    started = []

    def other_unit():
        with b.computing():
            started.append(time.monotonic())

    with a.computing():
        with a.timing():
            t = threading.Thread(target=other_unit)
            t0 = time.monotonic()
            t.start()
            time.sleep(0.4)
            assert started == []  # b waits for a's timing
        t.join(10)
    assert started and started[0] - t0 >= 0.35


def test_the_latency_process_reports_a_failure_naming_the_artifact(tmp_path):
    runner = LatencyProcess()
    try:
        with pytest.raises(LoradeployError, match="no-such-artifact: the latency run failed"):
            runner([str(tmp_path / "no-such-artifact"), "--shape", "1x8"])
        # the process survives a failed measurement and answers the next request
        with pytest.raises(LoradeployError, match="bad arguments"):
            runner([str(tmp_path / "x"), "--runs", "many"])
        assert runner._proc is not None and runner._proc.poll() is None
    finally:
        runner.close()
