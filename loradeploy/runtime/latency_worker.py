"""Latency worker: ``python -m loradeploy.runtime.latency_worker ARTIFACT [--adapter A]
--shape BxS …`` loads the artifact in this fresh process (only the runtime, no PyTorch model),
times each shape after warm-up, interleaved with the runtime's fixed reference unit, and prints
JSON with p50/p95 and the fastest call over the fastest reference per shape, peak RSS, and the
fingerprint (CPU, ISA level, runtime version, threads) that a latency comparison must match.
The timing itself is :mod:`loradeploy.timing`, through each session's ``measure``."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak RSS of this process image. ``VmHWM`` is reset by exec; ``ru_maxrss`` is not (it
    would report the parent's size after fork+exec), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loradeploy.runtime.latency_worker")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--adapter")
    ap.add_argument("--shape", action="append", required=True, help="BATCHxSEQ")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    return ap


def measure(argv: list[str]) -> dict:
    """Open the artifact, time its shapes, close it: the JSON record the worker prints."""
    from .. import registry
    from ..machine import fingerprint
    from . import open as open_session

    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    session = open_session(args.artifact, threads=args.threads, workers=1)
    load_ms = (time.perf_counter() - t0) * 1e3
    spec = registry.get(session.runtime)
    reference = session.reference_unit(args.threads)
    parsed = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shape]
    result = session.measure(args.adapter, parsed, args.warmup, args.runs, reference)
    version = session.runtime_version()
    session.close()
    return {"load_ms": load_ms, **result, "peak_rss_mb": peak_rss_mb(),
            "fingerprint": fingerprint(spec.name, spec.distribution, args.threads, version)}


def reset_peak_rss() -> bool:
    """Start ``VmHWM`` again from the current RSS (Linux ≥ 4.0: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def serve() -> int:
    """``--serve``: one measurement per stdin line (a JSON list of the arguments above), one
    JSON line back (``{"result": …}`` or ``{"error": …}``). A process that measures many
    artifacts in turn (``loradeploy fleet``) saves starting Python and the runtime each time;
    the peak-RSS mark is reset before each, so ``peak_rss_mb`` is each artifact's own peak
    over what the process holds between artifacts (the runtime's libraries)."""
    import sys

    for line in sys.stdin:
        try:
            argv = json.loads(line)
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS mark (/proc/self/clear_refs)")
            reply = {"result": measure([str(a) for a in argv])}
        except SystemExit as e:  # argparse
            reply = {"error": f"bad arguments ({e})"}
        except Exception as e:  # the measurement's failure is the caller's to report  # noqa: BLE001
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve()
    print(json.dumps(measure(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
