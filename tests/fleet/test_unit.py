"""What a fleet worker keeps between units (the machine-wide timing lock, the latency process),
and how it ends with the run that started it."""

import threading
import time

import pytest

from loradeploy.errors import LoradeployError
from loradeploy.fleet.unit import LatencyProcess, QuietMachine
from tests.support.fleet import alive


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


@pytest.mark.parametrize("parent_alive", [True, False])
def test_a_worker_whose_parent_died_while_it_started_ends(tmp_path, parent_alive):
    """A pool worker asks for SIGTERM on its parent's death once it runs its initializer; a parent
    killed before that (while the worker still imports) sends no signal, so the worker ends by
    itself when it finds it has been re-parented. One whose parent lives goes on until the parent
    dies."""
    import os
    import subprocess
    import sys

    pid_file = tmp_path / "worker.pid"
    worker = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
              "time.sleep(1.5); from loradeploy.fleet.unit import die_with_parent; "
              "die_with_parent(int(sys.argv[2])); time.sleep(60)")
    # the parent starts the worker and, unless it is to live, exits before the worker's call
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], "
              "str(__import__('os').getpid())]); time.sleep(30 if sys.argv[3] == 'live' else 0.5)")
    proc = subprocess.Popen([sys.executable, "-c", parent, worker, str(pid_file), "live" if parent_alive else "die"],
                            cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 10
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the worker started"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        if parent_alive:
            time.sleep(5)  # past the worker's call
            assert alive(pid)
            proc.kill()  # now the parent dies: the signal asked for ends the worker
        else:
            assert proc.wait(10) == 0
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        proc.kill()
        proc.wait()
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), 9)
            except ProcessLookupError:
                pass

