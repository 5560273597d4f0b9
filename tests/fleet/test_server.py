"""The resident fleet worker (``fleet serve``): a run handed to it gives the same index as a
run in the calling process, a re-run after one change runs that unit in the worker, a client
of another toolchain is refused and runs itself, errors keep their one line and exit code, a
client that leaves does not end the worker, and the worker ends when told or when idle."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from loradeploy.cli import main
from loradeploy.fleet import FleetConfig, server
from tests.support.cli import assert_bad_input, main_bad_input
from tests.support.profiles import quick_profile
from tests.support.fleet import alive, copy_examples, small_eval, write_spec

pytestmark = pytest.mark.slow  # each test starts a worker: ~8 s of imports


def _socket() -> Path:
    # a Unix socket's path is limited to ~107 bytes: pytest's folders can be longer
    return Path(tempfile.mkdtemp(prefix="ld-")) / "w.sock"


def _start(path: Path, *extra) -> int:
    """A detached worker on ``path``; its pid."""
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", "fleet", "serve", "--detach", "--socket", str(path),
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answer = server.ping(path)
    assert answer is not None and f"pid {answer['pid']} " in proc.stdout
    return answer["pid"]


def _stop(path: Path, pid: int) -> None:
    assert main(["fleet", "stop", "--socket", str(path)]) == 0
    for _ in range(300):
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid) and not path.exists()


def _workers(out: Path, index: dict) -> dict[str, int]:
    """The pid each unit that ran in this run ran in (from its state file)."""
    return {u["id"]: int(json.loads((out / f"{u['id']}.unit.json").read_text())["worker"].rsplit(":", 1)[1])
            for u in index["units"] if u["ran"]}


def test_runs_handed_to_the_resident_worker(tmp_path, capsys, monkeypatch):
    path = _socket()
    monkeypatch.setenv(server.SOCKET_ENV, str(path))
    examples = copy_examples(tmp_path, ("sora", "blora"))
    profile = quick_profile(tmp_path, "onnx-cpu")
    spec = write_spec(tmp_path, list(examples.values()), [str(profile)], eval=str(small_eval(tmp_path, 16)),
                      mode="swappable")
    assert main(["fleet", "run", str(spec), "-o", str(tmp_path / "here"), "--json"]) == 0  # no worker yet
    here = json.loads((tmp_path / "here" / "index.json").read_text())
    assert set(_workers(tmp_path / "here", here).values()) == {os.getpid()}

    pid = _start(path)
    try:
        capsys.readouterr()
        assert main(["fleet", "run", str(spec), "-o", str(tmp_path / "there"), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["fleet"]["resident_worker"] == {"pid": pid}
        there = json.loads((tmp_path / "there" / "index.json").read_text())
        assert set(_workers(tmp_path / "there", there).values()) == {pid}
        # the same units, keys and files as the run in this process
        assert {u["id"]: (u["key"], u["files"]) for u in there["units"]} == \
               {u["id"]: (u["key"], u["files"]) for u in here["units"]}

        # one adapter changes: the re-run runs only its unit, in the worker
        weights = tmp_path / "adapters" / "blora" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-2] ^= 1
        weights.write_bytes(bytes(data))
        assert main(["fleet", "run", str(spec), "-o", str(tmp_path / "there"), "--json"]) == 0
        rerun = json.loads((tmp_path / "there" / "index.json").read_text())
        assert _workers(tmp_path / "there", rerun) == {"onnx-cpu/blora": pid}

        # another toolchain (here: another LORADEPLOY_* setting) is refused and runs itself
        monkeypatch.setenv("LORADEPLOY_TEST_SETTING", "1")
        capsys.readouterr()
        assert main(["fleet", "run", str(spec), "-o", str(tmp_path / "there"), "--force", "--json"]) == 0
        err = capsys.readouterr().err
        assert f"resident fleet worker (pid {pid}, {path}) did not take the run: it runs other LORADEPLOY_* " \
               "settings than this command; running in this process" in " ".join(err.split())
        forced = json.loads((tmp_path / "there" / "index.json").read_text())
        assert set(_workers(tmp_path / "there", forced).values()) == {os.getpid()}
        monkeypatch.delenv("LORADEPLOY_TEST_SETTING")

        # a bad spec: the same one line and exit code as in this process, and the worker lives on
        bad = tmp_path / "bad.yaml"
        bad.write_text(spec.read_text() + "colour: blue\n")
        messages = []
        for flags in ([], ["--in-process"]):
            messages.append(main_bad_input(capsys, ["fleet", "run", str(bad), "-o", str(tmp_path / "bad-out"), *flags],
                                           "colour"))
        assert messages[0] == messages[1]
        assert not (tmp_path / "bad-out").exists()
        assert server.ping(path)["pid"] == pid
    finally:
        _stop(path, pid)
    assert main(["fleet", "stop", "--socket", str(path)]) == 1  # none answers now


def test_the_resident_workers_pool_outlives_a_run(tmp_path, monkeypatch):
    """With --workers 2 the worker's pool processes stay: a re-run's unit runs in one of them."""
    path = _socket()
    monkeypatch.setenv(server.SOCKET_ENV, str(path))
    examples = copy_examples(tmp_path, ("sora", "blora"))
    spec = write_spec(tmp_path, list(examples.values()), [str(quick_profile(tmp_path, "onnx-cpu"))],
                      eval=str(small_eval(tmp_path, 16)), mode="swappable")
    pid = _start(path)
    try:
        out = tmp_path / "out"
        assert main(["fleet", "run", str(spec), "-o", str(out), "--workers", "2", "--json"]) == 0
        first = _workers(out, json.loads((out / "index.json").read_text()))
        assert len(first) == 2 and pid not in first.values()
        weights = tmp_path / "adapters" / "blora" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-2] ^= 1
        weights.write_bytes(bytes(data))
        assert main(["fleet", "run", str(spec), "-o", str(out), "--workers", "2", "--json"]) == 0
        again = _workers(out, json.loads((out / "index.json").read_text()))
        assert list(again) == ["onnx-cpu/blora"] and again["onnx-cpu/blora"] in set(first.values())
    finally:
        _stop(path, pid)


def test_a_client_that_leaves_does_not_end_the_worker():
    path = _socket()
    pid = _start(path, "--idle-timeout", "120")
    try:
        for _ in range(3):  # ask, and leave before the answer is written
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                s.sendall(b'{"op": "ping"}\n')
        time.sleep(0.5)
        assert alive(pid) and server.ping(path)["pid"] == pid
    finally:
        _stop(path, pid)


def test_a_second_worker_on_one_socket_is_refused_and_an_idle_one_ends():
    path = _socket()
    pid = _start(path, "--idle-timeout", "3")
    proc = subprocess.run([sys.executable, "-m", "loradeploy.cli", "fleet", "serve", "--socket", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert_bad_input(proc.returncode, proc.stderr, "already listens", out=proc.stdout)
    assert proc.stderr.count("\n") == 1  # not even a progress line
    for _ in range(300):  # 3 s without a run
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid) and not path.exists()


def test_a_stale_socket_file_is_no_worker(tmp_path):
    """What a killed worker leaves: ``fleet run`` runs in its own process, ``serve`` replaces it."""
    path = _socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    assert path.exists() and server.ping(path) is None
    assert server.run_resident(FleetConfig(tmp_path / "fleet.yaml", tmp_path / "out"), print, path) is None
    pid = _start(path, "--idle-timeout", "60")
    _stop(path, pid)


def test_a_client_says_when_the_worker_is_busy_and_fails_in_one_line_when_it_ends(tmp_path):
    """A listener that does not accept (a worker busy with another run): the client says it
    waits; when the listener goes, the run fails with one error naming the socket."""
    import threading

    from loradeploy.errors import LoradeployError

    path = _socket()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    notes, outcome = [], {}

    def client():
        try:
            server.run_resident(FleetConfig(tmp_path / "fleet.yaml", tmp_path / "out"),
                                lambda kind, *a: notes.append((kind, *a)), path)
        except LoradeployError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=client)
    thread.start()
    for _ in range(100):
        if notes:
            break
        time.sleep(0.1)
    assert notes == [("note", f"the resident fleet worker on {path} is busy with another run: waiting for it")]
    assert thread.is_alive()  # still waiting
    listener.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome["error"].startswith(f"the resident fleet worker ({path}) ended during the run")
