"""A resident fleet worker: ``loradeploy fleet serve`` keeps one process with the toolchain
imported, listening on a Unix socket, and ``fleet run`` hands its run to it when one answers for
the same toolchain. A fresh process pays the interpreter, the imports of PyTorch, transformers,
PEFT and the runtime (7–8 s on 2 cores) and the base load before its first unit; the resident
worker pays them once, keeps the bases it loaded and its pool processes, so a re-run after one
adapter changed costs about that unit.

The worker runs one fleet at a time (a second ``fleet run`` waits for it), with the same code
path as a run in the calling process (:func:`~loradeploy.fleet.run.run_fleet`): the output
folder, the index and the unit keys are the same either way. It is used only when it runs the
same toolchain — the same Python, the same loradeploy code (the sha256 the unit keys hold) and
the same ``LORADEPLOY_*`` settings; otherwise ``fleet run`` says so and runs in its own process.
It ends after ``--idle-timeout`` seconds without a run, on ``loradeploy fleet stop``, or on
SIGTERM/SIGINT.

The socket is ``$LORADEPLOY_FLEET_SOCKET``, else ``loradeploy-UID/fleet.sock`` in the temporary
folder (the folder private to the user, the socket 0600). Protocol: one JSON object per line;
the client sends ``{"op": "ping" | "stop" | "run", ...}``; a run answers with ``{"event": [...]}``
lines (the progress callback's arguments) and ends with ``{"index": ...}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import LoradeployError

SOCKET_ENV = "LORADEPLOY_FLEET_SOCKET"
DEFAULT_IDLE_TIMEOUT = 1800.0
BUSY_NOTE_AFTER = 2.0  # s without the worker's first answer before the client says it waits
#: what a worker imports before it answers: the bulk of what a unit needs (a runtime's own package,
#: imported by its plugin on first use, comes with the first run)
WARM_IMPORTS = ("loradeploy.export", "loradeploy.validate", "loradeploy.adapters.peft", "peft", "transformers")


def socket_path() -> Path:
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"loradeploy-{os.getuid()}" / "fleet.sock"


def identity() -> dict:
    """What must match for a worker to run a client's fleet as the client itself would."""
    from .spec import source_sha256

    return {"python": sys.executable, "loradeploy": __version__, "source": source_sha256(),
            "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORADEPLOY_")
                         and k not in (SOCKET_ENV, "LORADEPLOY_DEBUG")}}


class ClientGone(Exception):
    """The client that asked for a run closed its connection (killed or interrupted)."""


def _request(stream, message: dict) -> None:
    """One message: a JSON object on one line."""
    stream.write((json.dumps(message, default=str) + "\n").encode())
    stream.flush()


def _send(stream, message: dict) -> None:
    """One message from the worker to its client, who may have left."""
    try:
        _request(stream, message)
    except (BrokenPipeError, ConnectionResetError) as e:
        raise ClientGone() from e


# --- the worker ------------------------------------------------------------------------------

class ResidentWorker:
    def __init__(self, path: Path | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 log: Callable[[str], None] | None = None):
        self.path = Path(path or socket_path())
        self.idle_timeout = idle_timeout
        self.log = log or (lambda _m: None)
        self.identity: dict = {}

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if listening(self.path):
                raise LoradeployError(f"{self.path}: a resident fleet worker already listens there "
                                      "(stop it with `loradeploy fleet stop`)")
            self.path.unlink()  # left by a worker that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise LoradeployError(f"{self.path}: cannot listen there ({e.strerror or e})") from e
        finally:
            os.umask(old)
        sock.listen(16)
        return sock

    def serve(self) -> None:
        """Listen until idle for ``idle_timeout`` seconds, stopped, or sent SIGTERM/SIGINT."""
        import importlib

        from .executors import POOLS

        sock = self._bind()
        stop = {"now": False}

        def on_signal(_signum, _frame):
            stop["now"] = True
            raise KeyboardInterrupt

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for name in WARM_IMPORTS:
                importlib.import_module(name)
            self.identity = identity()
            POOLS.keep = True
            self.log(f"resident fleet worker pid {os.getpid()} listening on {self.path} "
                     f"(ends after {self.idle_timeout:g} s without a run)")
            sock.settimeout(self.idle_timeout)
            while not stop["now"]:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    self.log("idle: ending")
                    break
                conn.settimeout(None)
                stream = conn.makefile("rwb")
                try:
                    if self._handle(stream) == "stop":
                        break
                finally:
                    with contextlib.suppress(OSError):  # a client that left: what was buffered goes nowhere
                        stream.close()
                    conn.close()
        except KeyboardInterrupt:
            self.log("stopped by a signal")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            sock.close()
            self.path.unlink(missing_ok=True)
            POOLS.close()

    def _handle(self, stream) -> str | None:
        try:
            request = json.loads(stream.readline() or b"{}")
        except ValueError:
            return None
        op = request.get("op")
        try:
            if op == "ping":
                _send(stream, {"pid": os.getpid(), "identity": self.identity})
            elif op == "stop":
                self.log("stopped by `loradeploy fleet stop`")
                _send(stream, {"stopped": os.getpid()})
                return "stop"
            elif op == "run":
                self._run(stream, request)
        except ClientGone:
            self.log("the client left (the units finished are recorded)")
        return None

    def _run(self, stream, request: dict) -> None:
        from .run import FleetConfig, run_fleet

        theirs = request.get("identity") or {}
        if theirs != self.identity:
            what = {"python": "another Python", "loradeploy": "another loradeploy version",
                    "source": "other loradeploy code", "settings": "other LORADEPLOY_* settings"}
            differ = [what.get(k, k) for k in sorted(set(theirs) | set(self.identity))
                      if theirs.get(k) != self.identity.get(k)]
            _send(stream, {"refused": f"it runs {', '.join(differ)} than this command", "pid": os.getpid()})
            return
        _send(stream, {"started": os.getpid()})
        t0 = time.perf_counter()
        config = FleetConfig(**{**request["config"], "spec": Path(request["config"]["spec"]),
                                "out": Path(request["config"]["out"])})
        self.log(f"run {config.spec} -> {config.out}")
        try:
            index = run_fleet(config, lambda *event: _send(stream, {"event": list(event)}))
        except ClientGone:
            raise
        except LoradeployError as e:
            _send(stream, {"error": str(e)})
            return
        except Exception as e:  # a bug: the client reports it as its own internal error  # noqa: BLE001
            _send(stream, {"internal": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)})
            return
        _send(stream, {"index": index})
        self.log(f"done in {time.perf_counter() - t0:.1f} s: {index['summary']}")


# --- the client ------------------------------------------------------------------------------

def _connect(path: Path, timeout: float | None = 5.0) -> socket.socket | None:
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:  # refused (a killed worker's socket file), or no permission
        sock.close()
        return None
    return sock


def listening(path: Path) -> bool:
    """Whether a process listens on ``path`` (a worker, answering or busy with a run)."""
    sock = _connect(Path(path))
    if sock is None:
        return False
    sock.close()
    return True


def _ask(path: Path, request: dict, timeout: float | None = 5.0) -> dict | None:
    sock = _connect(path, timeout)
    if sock is None:
        return None
    try:
        with sock, sock.makefile("rwb") as stream:
            _request(stream, request)
            line = stream.readline()
    except OSError:  # busy with a run longer than the timeout, or gone
        return None
    return json.loads(line) if line else None


def ping(path: Path | None = None, timeout: float | None = 5.0) -> dict | None:
    """The worker's pid and identity, or None when none answers at ``path``."""
    return _ask(Path(path or socket_path()), {"op": "ping"}, timeout)


def stop(path: Path | None = None, timeout: float | None = None) -> int | None:
    """Stop the worker at ``path`` (after the run it is busy with); its pid, or None."""
    reply = _ask(Path(path or socket_path()), {"op": "stop"}, timeout)
    return reply.get("stopped") if reply else None


class Refused(Exception):
    """A worker answered but runs another toolchain."""


def run_resident(config, progress: Callable, path: Path | None = None) -> tuple[dict, int] | None:
    """Run ``config`` (a :class:`~loradeploy.fleet.run.FleetConfig`) on the resident worker:
    the index and the worker's pid, or None when no worker answers at ``path``. Raises
    :class:`Refused` when one answers for another toolchain, and what the run raised otherwise."""
    path = Path(path or socket_path())
    sock = _connect(path, timeout=None)
    if sock is None:
        return None
    fields = {**dataclasses.asdict(config), "spec": str(Path(config.spec).absolute()),
              "out": str(Path(config.out).absolute())}
    pid = None
    with sock, sock.makefile("rwb") as stream:
        _request(stream, {"op": "run", "config": fields, "identity": identity()})
        if not select.select([sock], [], [], BUSY_NOTE_AFTER)[0]:
            progress("note", f"the resident fleet worker on {path} is busy with another run: waiting for it")
        try:
            for line in stream:
                message = json.loads(line)
                if "event" in message:
                    progress(*message["event"])
                elif "started" in message:
                    pid = message["started"]
                elif "index" in message:
                    return message["index"], pid
                elif "refused" in message:
                    raise Refused(f"the resident fleet worker (pid {message['pid']}, {path}) did not take the run: "
                                  f"{message['refused']}")
                elif "error" in message:
                    raise LoradeployError(message["error"])
                elif "internal" in message:
                    raise RuntimeError(f"in the resident fleet worker (pid {pid}): {message['internal']}")
        except (OSError, ValueError):  # reset, or a line cut off: the worker ended
            pass
    raise LoradeployError(f"the resident fleet worker ({f'pid {pid}, ' if pid else ''}{path}) ended during the run; "
                          "the units it finished are recorded: run again")


def start_detached(path: Path | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                   wait: float = 300.0) -> int:
    """Start ``loradeploy fleet serve`` in its own session, its log beside the socket; returns its
    pid once it answers."""
    import subprocess

    path = Path(path or socket_path())
    if listening(path):
        raise LoradeployError(f"{path}: a resident fleet worker already listens there")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = path.with_name(path.name + ".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loradeploy.cli", "fleet", "serve", "--socket", str(path),
                                 "--idle-timeout", str(idle_timeout)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LoradeployError(f"the resident fleet worker ended at start (exit {proc.returncode}): {tail[0]}")
        if path.exists():  # bound: it answers once its imports are done
            answer = ping(path, timeout=max(1.0, deadline - time.monotonic()))
            if answer is not None and answer.get("pid") == proc.pid:
                return proc.pid
        time.sleep(0.2)
    proc.terminate()
    raise LoradeployError(f"the resident fleet worker did not answer within {wait:g} s (log: {log})")
