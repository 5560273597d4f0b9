"""``manifest.json``: what an artifact is made of and how it did, as typed records. The one
reader and writer of manifests; PyTorch-free, so the runtime side (sessions, the latency worker,
``verify``) reads it too.

Reproducible parts (inputs, decisions, files with sha256) are apart from ``validation`` (what was
measured) and ``environment`` (versions, machine, time), which comparisons ignore."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import ManifestError
from .fsutil import file_sha256

MANIFEST = "manifest.json"
REPORT = "report.html"
#: the folder of a swappable artifact holding each adapter's file (or PEFT folder) under its name
ADAPTER_DIR = "adapters"
#: what an adapter name may hold (it names a file in ADAPTER_DIR): :func:`is_adapter_name`
ADAPTER_NAME_RULE = "use letters, digits, '-', '_' or '.'"
MANIFEST_VERSION = 1
#: the sha256 of the manifest's own canonical body (every other key; see :func:`body_sha256`).
#: Newer than version 1: a manifest without it reads, and ``verify`` notes that nothing protects it.
SELF_SHA256 = "manifest_sha256"
#: packages whose versions every manifest records (each runtime adds its own, see registry)
CORE_PACKAGES = ("torch", "transformers", "peft", "safetensors", "numpy")


def is_adapter_name(name: str) -> bool:
    """Whether ``name`` may name an adapter (:data:`ADAPTER_NAME_RULE`)."""
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def _need(where: str, data: dict, key: str, kind, optional: bool = False):
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}: {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


@dataclass
class FileRecord:
    path: str
    sha256: str
    bytes: int


@dataclass
class BaseRecord:
    spec: str  # as the user named it (alias, folder, GGUF file)
    path: str
    weights: list[dict]  # [{"file", "sha256"}]

    @property
    def shas(self) -> list[str]:
        return sorted(w.get("sha256", "") for w in self.weights)


@dataclass
class AdapterRecord:
    name: str
    method: str
    sources: list[dict]  # [{"path", "sha256", "bytes"}] as read
    file: str | None  # path in the artifact (swappable), None when merged
    ranks: dict = field(default_factory=dict)
    rank_total: list = field(default_factory=list)
    lora_bytes: list = field(default_factory=list)
    bit_hints: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    plan: dict | None = None
    labels: list | None = None  # class names by label id (classifiers whose config names them)


@dataclass
class TargetRecord:
    name: str
    runtime: str
    profile: dict  # the profile as validated (see profile_dict)


@dataclass
class Validation:
    eval_file: str
    eval_inputs: int
    metrics: dict  # label (adapter, "merged", "base alone") → measure → value
    latency: dict
    artifact_bytes: int
    checks: list[dict]
    passed: bool
    eval_note: str | None = None  # what the eval set can and cannot tell about this base
    verdict: str | None = None  # one line: PASS, FAIL: …, UNGATED: … (loradeploy.verdict)


@dataclass
class Manifest:
    target: TargetRecord
    mode: str
    task: str
    num_labels: int | None
    base: BaseRecord
    read_options: dict
    adapters: list[AdapterRecord]
    decisions: dict  # what the target chose (plugin-specific), the plan and the mode selection
    files: list[FileRecord]
    tool: dict = field(default_factory=lambda: {"name": "loradeploy", "version": __version__})
    manifest_version: int = MANIFEST_VERSION
    validation: Validation | None = None
    environment: dict | None = None
    artifact: str | None = None  # where it was written (not stored in the file)

    @property
    def runtime(self) -> str:
        return self.target.runtime

    @property
    def swappable_adapters(self) -> list[AdapterRecord]:
        """The adapters kept beside the base as their own files (swappable mode)."""
        return [a for a in self.adapters if a.file]

    def adapter(self, name: str) -> AdapterRecord | None:
        return next((a for a in self.adapters if a.name == name), None)

    def to_dict(self) -> dict:
        """The JSON form (key order fixed: the reproducible part comes first)."""
        out = {"manifest_version": self.manifest_version, "tool": self.tool, "target": asdict(self.target),
               "mode": self.mode, "task": self.task, "num_labels": self.num_labels, "base": asdict(self.base),
               "read_options": self.read_options,
               "adapters": [{k: v for k, v in asdict(a).items() if k not in ("plan", "labels") or v is not None}
                            for a in self.adapters],
               "decisions": self.decisions, "files": [asdict(f) for f in self.files]}
        if self.validation is not None:
            out["validation"] = asdict(self.validation)
        if self.environment is not None:
            out["environment"] = self.environment
        if self.artifact is not None:
            out["artifact"] = self.artifact
        return out

    @classmethod
    def from_dict(cls, data, where: str = MANIFEST) -> "Manifest":
        """Parse and check a manifest's JSON form; raises :class:`ManifestError` naming the field."""
        if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
            raise ManifestError(f"{where}: not a loradeploy manifest (version {MANIFEST_VERSION})")
        target = _need(where, data, "target", dict)
        base = _need(where, data, "base", dict)
        files = data.get("files")
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
                and isinstance(f.get("bytes"), int) and not isinstance(f.get("bytes"), bool) for f in files):
            raise ManifestError(f"{where}: the manifest's file list is missing or malformed (each entry needs "
                                "path, sha256, bytes)")
        adapters = _need(where, data, "adapters", list)
        names = {f.name for f in fields(AdapterRecord)}
        if not all(isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("method"), str)
                   and isinstance(a.get("sources"), list) and (a.get("file") is None or isinstance(a["file"], str))
                   for a in adapters):
            raise ManifestError(f"{where}: the adapter list is malformed (each entry needs name, method, sources)")
        weights = _need(where, base, "weights", list)
        if not all(isinstance(w, dict) for w in weights):
            raise ManifestError(f"{where}: base.weights is malformed")
        validation = _need(where, data, "validation", dict, optional=True)
        if validation is not None:
            keys = {f.name for f in fields(Validation) if f.default is MISSING}  # eval_note: newer, optional
            if not keys <= set(validation) or not isinstance(validation.get("metrics"), dict):
                raise ManifestError(f"{where}: the validation record is malformed (needs {', '.join(sorted(keys))})")
            note, verdict = validation.get("eval_note"), validation.get("verdict")
            validation = Validation(**{k: validation[k] for k in keys},
                                    eval_note=note if isinstance(note, str) else None,
                                    verdict=verdict if isinstance(verdict, str) else None)
        return cls(
            target=TargetRecord(_need(where, target, "name", str), _need(where, target, "runtime", str),
                                _need(where, target, "profile", dict)),
            mode=_need(where, data, "mode", str), task=_need(where, data, "task", str),
            num_labels=_need(where, data, "num_labels", int, optional=True),
            base=BaseRecord(str(base.get("spec", "")), str(base.get("path", "")), weights),
            read_options=_need(where, data, "read_options", dict, optional=True) or {},
            adapters=[AdapterRecord(**{"file": None, **{k: v for k, v in a.items() if k in names}}) for a in adapters],
            decisions=_need(where, data, "decisions", dict, optional=True) or {},
            files=[FileRecord(f["path"], f["sha256"], f["bytes"]) for f in files],
            tool=data.get("tool") if isinstance(data.get("tool"), dict) else {},
            validation=validation, environment=data.get("environment") if isinstance(data.get("environment"), dict)
            else None)


def file_entries(folder: Path) -> list[FileRecord]:
    """Every file of the artifact (but the manifest and report) with its sha256 and size."""
    return [FileRecord(p.relative_to(folder).as_posix(), file_sha256(p), p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, REPORT)]


def environment(packages: tuple[str, ...] = ()) -> dict:
    """When and where: Python, platform, CPU count, and the versions of the core packages and
    ``packages`` (the runtimes')."""
    versions = {}
    for dist in dict.fromkeys((*CORE_PACKAGES, *packages)):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "created_unix": int(time.time()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
        "versions": versions,
    }


def profile_dict(profile) -> dict:
    """The profile as a manifest records it: a runtime's own options at the top level, as its YAML
    writes them (after ``description``)."""
    d, out = asdict(profile), {}
    options = d.pop("options", {})
    for key, value in d.items():
        out[key] = value
        if key == "description":
            out.update(options)
    out["shapes"] = [{"batch": s["batch"], "seq": s["seq"]} for s in out["shapes"]]
    return out


def body_sha256(data: dict) -> str:
    """sha256 of a manifest's JSON data without :data:`SELF_SHA256`, in canonical form (keys
    sorted, no spaces, non-ASCII escaped): what the manifest records about itself, so that an
    edited measure or file entry shows."""
    body = {k: v for k, v in data.items() if k != SELF_SHA256}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(data: dict) -> dict:
    """``data`` as JSON reads it back (tuples as lists, keys as strings) with its
    :data:`SELF_SHA256` set."""
    data = json.loads(json.dumps({k: v for k, v in data.items() if k != SELF_SHA256}, default=str))
    return {**data, SELF_SHA256: body_sha256(data)}


def self_check(path: Path) -> bool | None:
    """Whether the manifest file at ``path`` still has the body its :data:`SELF_SHA256` records;
    None when it records none (written before the field existed)."""
    data = json.loads(Path(path).read_text())
    recorded = data.get(SELF_SHA256) if isinstance(data, dict) else None
    return None if recorded is None else recorded == body_sha256(data)


def write(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    data = manifest.to_dict()
    data.pop("artifact", None)
    path.write_text(json.dumps(sealed(data), indent=2, sort_keys=False) + "\n")
    return path


def read(folder: Path) -> Manifest:
    """The manifest of the artifact in ``folder``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST}: not a loradeploy artifact")
    manifest = read_file(path)
    manifest.artifact = str(Path(folder).absolute())
    return manifest


def read_file(path: Path) -> Manifest:
    """A manifest from its own file (e.g. a baseline kept apart from its artifact)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, huge integers
        raise ManifestError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return Manifest.from_dict(data, str(path))


#: manifest parts that differ run to run (when and where it ran, what it measured in time)
NOT_REPRODUCIBLE = ("environment", "artifact", "validation", SELF_SHA256)


def reproducible(manifest: Manifest | dict) -> dict:
    """The part of a manifest that the same inputs and options reproduce byte for byte: inputs,
    decisions, adapters, profile and every file's sha256. Timings, machine facts and the output
    path are left out (``validation`` holds latency; its fidelity measures are compared by
    ``loradeploy check``)."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    return {k: v for k, v in data.items() if k not in NOT_REPRODUCIBLE}
