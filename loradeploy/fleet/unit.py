"""One unit of a fleet, run in a worker (a pool process, a Ray task or the driver itself): the
``export`` verb on one (adapter, target), with what a worker keeps between units — the loaded
fp32 base, and the shared base graph of each (base, target, slot layout), built once per fleet
output under a file lock and hard-linked into every artifact that uses it.

A unit ends with its artifact renamed into place and then its state file (``ADAPTER.unit.json``
beside it) written: a unit whose state names its current key and whose files match their
manifest is up to date, so a killed run resumes with the units it had not finished."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from ..errors import LoradeployError
from ..fsutil import atomic_output_dir, write_text_atomic
from .spec import Unit, digest

SHARED_DIR = "_shared"
STATE_SUFFIX = ".unit.json"
_BASES: dict[tuple, tuple] = {}  # (base, task, labels) → loaded, least recently used first
KEPT_BASES = 2


class QuietMachine:
    """A machine-wide reader-writer lock (``flock`` on a file in the temporary folder): a unit
    computes holding it shared, and times its artifact holding it exclusively, so latency is
    measured while no other unit of any fleet on this machine runs."""

    def __init__(self):
        self.path = Path(tempfile.gettempdir()) / f"loradeploy-quiet-{os.getuid()}.lock"
        self._fd = None

    @contextlib.contextmanager
    def computing(self):
        self._fd = open(self.path, "a")
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._fd.close()
            self._fd = None

    @contextlib.contextmanager
    def timing(self):
        if self._fd is None:  # not inside a unit
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_SH)


QUIET = QuietMachine()


class LatencyProcess:
    """One ``python -m loradeploy.runtime.latency_worker --serve`` per worker, measuring each unit's artifact
    in turn (started on first use, again if it died)."""

    def __init__(self):
        self._proc = None

    def start(self) -> None:
        """Start the process unless it is running."""
        import subprocess
        import sys

        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "loradeploy.runtime.latency_worker", "--serve"],
                                          text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
            atexit.register(self.close)

    def __call__(self, args: list[str]) -> dict:
        self.start()
        self._proc.stdin.write(json.dumps(args) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            self._proc = None
            raise LoradeployError(f"{args[0]}: the latency process ended without a result")
        reply = json.loads(line)
        if "error" in reply:
            raise LoradeployError(f"{args[0]}: the latency run failed ({reply['error']})")
        return reply["result"]

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        self._proc = None


LATENCY = LatencyProcess()


class SharedTiming:
    """The latency runner of a unit whose artifact is a shared base graph plus its adapter: the
    timing depends only on the graph, the adapter's tensor types and shapes
    (``Session.timing_signature``), the timing arguments and the machine, so it is measured once
    per such key in ``OUT/_shared/TARGET/GRAPH/latency/`` and every other unit with the same key
    takes that record, marked with where it came from (``timing``: measured by which unit, the
    key). Units without a shared graph, or runtimes without a signature, are always timed."""

    def __init__(self, unit: Unit, used: list[Path], runner, guard):
        self.unit, self.used, self.runner, self.guard = unit, used, runner, guard

    def _timed(self, args: list[str]) -> dict:
        with self.guard():
            return self.runner(args)

    def __call__(self, args: list[str]) -> dict:
        if not self.used or "--adapter" not in args:
            return self._timed(args)
        from .. import registry
        from ..machine import fingerprint
        from ..manifest import ADAPTER_DIR
        from ..profile import load_profile

        spec = registry.get(load_profile(self.unit.target).runtime)
        adapter = args[args.index("--adapter") + 1]
        adapter_file = Path(args[0]) / ADAPTER_DIR / f"{adapter}{spec.adapter_suffix}"
        signature = spec.session_class().timing_signature(adapter_file) if adapter_file.exists() else None
        if signature is None:
            return self._timed(args)
        threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 0
        graph = self.used[-1]
        key = digest({"graph": graph.name, "adapter": signature, "args": [a for a in args[1:] if a != adapter],
                      "machine": {**fingerprint(spec.name, spec.distribution, threads), "node": os.uname().nodename}})
        folder = graph / "latency"
        folder.mkdir(exist_ok=True)
        path = folder / f"{key[:16]}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            record["timing"] = {**record["timing"], "reused_by": f"{self.unit.target_name}/{self.unit.adapter}"}
            return record
        # no lock held while timing (a unit waiting on one would hold its share of the machine
        # and the timing could never start): two workers racing on one key both time it, the
        # last record written is the one later units take
        record = self._timed(args)
        record["timing"] = {"key": key, "measured_by": f"{self.unit.target_name}/{self.unit.adapter}",
                            "shared_by": "units whose adapter tensors have these names, types and shapes, "
                                         "on this graph, with these timing arguments, on this machine"}
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
        return record


def state_path(out: Path, unit: Unit) -> Path:
    return Path(out) / unit.target_name / f"{unit.adapter}{STATE_SUFFIX}"


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when ``parent``, the process that started it, dies (a
    pool worker must not outlive a killed fleet run, holding a loaded base). If ``parent`` died
    already — before this call, while the worker was still starting — it ends now: the signal
    is only sent for a death after the call."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # re-parented: the run is gone
        os._exit(1)


def init_worker(threads: int, parent: int | None = None) -> None:
    """A worker: its share of the cores for PyTorch's intra-op threads; a pool process (started
    by the process ``parent``) also ends with the run that started it."""
    if parent is not None:
        die_with_parent(parent)
    import torch

    torch.set_num_threads(max(1, threads))
    from ..logs import quiet_third_party_logs

    quiet_third_party_logs()


def _cached_base(base: str, entries: tuple):
    """The one base loader, kept loaded for the worker's next units of the same base."""
    from ..job import check_adapters_fit, load_base_for

    first = entries[0].original
    key = (base, first.task, first.num_labels)
    if key not in _BASES:
        while len(_BASES) >= KEPT_BASES:  # a resident worker sees many specs: keep the latest
            del _BASES[next(iter(_BASES))]
        _BASES[key] = load_base_for(base, entries)
        return _BASES[key]
    _BASES[key] = _BASES.pop(key)  # most recently used last
    check_adapters_fit(base, _BASES[key][3], entries)
    return _BASES[key]


def _shared_base(out: Path, used: list[Path]):
    """The ``shared`` hook of :func:`loradeploy.export.export` for this fleet output; the
    folders it hands out are appended to ``used``."""
    def shared(job):
        from .. import registry
        from ..export import _base_record
        from ..manifest import profile_dict
        from .spec import _versions

        plugin = registry.get(job.profile.runtime).target_plugin()
        signature = plugin.shared_base(job)
        if signature is None:
            return None
        key = digest({"signature": signature, "base": _base_record(job.base_spec, job.base_dir).weights,
                      "profile": {k: v for k, v in profile_dict(job.profile).items() if k != "source"},
                      "task": job.task.value, "labels": job.num_labels, "versions": _versions()})
        root = Path(out) / SHARED_DIR / job.profile.name
        folder = root / key[:16]
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{key[:16]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait, then reuse
            if not (folder / "decisions.json").is_file():
                with atomic_output_dir(folder, overwrite=True) as tmp:
                    decisions = plugin.export_shared(job, signature, tmp)
                    (tmp / "signature.json").write_text(json.dumps({"key": key, **signature}, indent=1))
                    (tmp / "decisions.json").write_text(json.dumps(decisions, indent=1, default=str))
        used.append(folder)
        return folder, json.loads((folder / "decisions.json").read_text())
    return shared


def run_unit(unit_data: dict, out: str) -> dict:
    """Export one unit into ``out/TARGET/ADAPTER`` and write its state; never raises: an error
    is the unit's result (status ``error`` and its one-line message)."""
    from ..adapters import ReadOptions
    from ..export import ExportConfig, export
    from ..ir import Method
    from ..job import AdapterInputs, AdapterSpec
    from ..quantize import PlanConfig

    unit = Unit(**unit_data)
    out_dir = Path(out)
    t0 = time.perf_counter()
    result = {"id": unit.id, "adapter": unit.adapter, "target": unit.target_name, "key": unit.key, "ran": True,
              "worker": f"{os.uname().nodename}:{os.getpid()}"}
    try:
        inputs = AdapterInputs((AdapterSpec(unit.adapter, Path(unit.path)),),
                               Method(unit.format) if unit.format else None,
                               ReadOptions(unit.lora_alpha, unit.lora_r, Path(unit.head) if unit.head else None))
        config = ExportConfig(unit.base, inputs, unit.target, out_dir / unit.target_name / unit.adapter, unit.mode,
                              Path(unit.eval) if unit.eval else None, PlanConfig.parse(unit.plan), overwrite=True,
                              slots=unit.slots)
        state_path(out_dir, unit).unlink(missing_ok=True)  # the old state no longer describes the folder
        # made here, not by the export (which removes parents it made when it fails): the units of a
        # target share it, and each writes its state there, failed or not
        state_path(out_dir, unit).parent.mkdir(parents=True, exist_ok=True)
        used: list[Path] = []
        timing = SharedTiming(unit, used, LATENCY, QUIET.timing)  # holds QUIET.timing() while it times
        with QUIET.computing():
            manifest = export(config, None, _cached_base, _shared_base(out_dir, used), timing)
        result.update(status="pass" if manifest["validation"]["passed"] else "fail", mode=manifest["mode"],
                      shared=used[-1].relative_to(out_dir).as_posix() if used else None)
    except LoradeployError as e:
        result.update(status="error", message=str(e))
    except Exception as e:  # a bug: this unit's result, not the fleet's end  # noqa: BLE001
        result.update(status="error", message=f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                      traceback=traceback.format_exc(limit=8))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    path = state_path(out_dir, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return result
