"""What a latency number depends on besides the artifact: the CPU (model and instruction-set
level), the runtime and its version, and the threads it ran with. ``check`` compares latency
only between runs whose fingerprints match (machines of one kind still differ in CPU: AVX2
only on some, AVX-512/VNNI/AMX on others, and the runtimes pick other kernels there)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

#: x86-64 micro-architecture levels (psABI) by the /proc/cpuinfo flags each adds
_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
)
#: extensions that change which int8/bf16 kernels a runtime picks, beyond the level
_EXTRAS = ("avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
#: the fields that must be equal for two latency measurements to be compared
MATCH_KEYS = ("cpu_model", "isa", "cpu_count", "runtime", "runtime_version", "threads", "reference")
#: how the latency ratio is defined (the reference unit and how a block of it is timed); a
#: ratio measured under another definition is not comparable. 2: units run back to back for as
#: long as the call, interleaved call by call
REFERENCE_DEFINITION = "unit-block-v2"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def isa_level(flags: set[str]) -> str:
    """``x86-64-v3+avx512_vnni``-style: the highest level whose flags (and those of every lower
    level) are all present, plus the int8/bf16 extensions; other machines: their arch name."""
    if not flags:
        return platform.machine()
    level, have = "x86-64", set()
    for name, needed in reversed(_LEVELS):  # v2, then v3, then v4: each needs the ones below
        have |= needed
        if not have <= flags:
            break
        level = name
    extras = [e for e in _EXTRAS if e in flags]
    return "+".join([level, *extras])


def fingerprint(runtime: str, distribution: str, threads: int, version: str | None = None) -> dict:
    """This machine and ``runtime`` at ``version`` (None: its Python distribution's installed
    version) at ``threads`` intra-op threads (0: the runtime's default, recorded as the CPU count
    it then uses)."""
    model, flags = _cpuinfo()
    if version is None:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            version = None
    cpus = os.cpu_count() or 1
    return {"cpu_model": model, "isa": isa_level(flags), "cpu_count": cpus, "runtime": runtime,
            "runtime_version": version, "threads": threads or cpus, "reference": REFERENCE_DEFINITION}


def mismatch(a: dict | None, b: dict | None) -> list[str]:
    """The fingerprint fields that differ (``["fingerprint"]`` when one is missing)."""
    if not a or not b:
        return ["fingerprint"]
    return [k for k in MATCH_KEYS if a.get(k) != b.get(k)]
