"""The fleet spec (YAML): one base, many adapters (paths and globs), several targets. It expands
into units — one (adapter, target) pair each — keyed by the sha256 of everything their artifact
depends on, so a re-run redoes exactly the units whose inputs changed.

    version: 1
    base: minilm                      # as `export --base` takes it
    adapters:
      - {name: sora, path: adapters/sora, head: adapters/sora/head.safetensors}
      - {glob: "customers/*", format: peft}   # each match a unit; named by its folder or file stem
    targets:
      - onnx-cpu                        # a profile name or YAML path
      - {target: onnx-cpu-int8, name: int8, mode: swappable, plan: uniform:8}
    mode: swappable                   # default for targets that name none (else the profile's)
    eval: eval.jsonl                  # default: the shipped set for the task
    slots: blocks,norms
    resources: {num_cpus: 1}          # per unit, for --executor ray

Paths are relative to the spec's folder. Nothing in a spec is guessed: an unknown key, a glob
matching nothing, two adapters or targets with one name, or a target that does not exist is a
:class:`~loradeploy.errors.SpecError`, raised before anything is written.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import yaml

from .. import __version__
from ..errors import LoradeployError, SpecError, did_you_mean
from ..fsutil import file_sha256
from ..kinds import MODES
from ..manifest import ADAPTER_NAME_RULE, is_adapter_name

SPEC_VERSION = 1
TOP_KEYS = {"version", "base", "adapters", "targets", "mode", "plan", "eval", "slots", "resources"}
ADAPTER_KEYS = {"name", "path", "glob", "format", "head", "lora_alpha", "lora_r"}
TARGET_KEYS = {"target", "name", "mode", "plan", "slots"}
RESOURCE_KEYS = {"num_cpus", "memory"}


@dataclass(frozen=True)
class Unit:
    """One (adapter, target) export of a fleet; paths absolute."""

    adapter: str
    path: str
    target_name: str
    target: str
    base: str
    format: str | None = None
    head: str | None = None
    lora_alpha: float | None = None
    lora_r: int | None = None
    mode: str | None = None
    plan: str | None = None
    slots: str | None = None
    eval: str | None = None
    key: str = ""

    @property
    def id(self) -> str:
        """``TARGET/ADAPTER``: also the artifact's folder under the fleet's output."""
        return f"{self.target_name}/{self.adapter}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FleetSpec:
    path: Path
    sha256: str
    units: tuple[Unit, ...]
    resources: dict


def _unknown(where: str, data: dict, allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise SpecError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                        f"(allowed: {', '.join(sorted(allowed))})")


def _text(where: str, value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def _name_ok(where: str, name: str) -> str:
    if not is_adapter_name(name) or name.startswith("."):
        raise SpecError(f"{where}: name {name!r}: {ADAPTER_NAME_RULE}")
    return name


def _resolve(root: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else (root / p)


def _entries(where: str, items, section: str, short: str, allowed: set[str]):
    """(where, mapping) per entry of a list section; a bare string is ``{short: string}``."""
    if isinstance(items, str) and section == "targets":
        items = [items]
    if not isinstance(items, list) or not items:
        raise SpecError(f"{where}: `{section}` must be a non-empty list")
    for n, item in enumerate(items, 1):
        at = f"{where}: {section}[{n}]"
        if isinstance(item, str):
            item = {short: item}
        if not isinstance(item, dict):
            raise SpecError(f"{at}: expected a {short} or a mapping, got {type(item).__name__}")
        _unknown(at, item, allowed)
        yield at, item


def _distinct(where: str, names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{where}: two {what} are named {', '.join(map(repr, dupes))}; give each a distinct `name`")


def _read_options(at: str, item: dict) -> dict:
    """The entry's format and read options, checked."""
    from ..ir import Method

    out = {k: item[k] for k in ("format", "lora_alpha", "lora_r") if item.get(k) is not None}
    if "format" in out and out["format"] not in {m.value for m in Method}:
        raise SpecError(f"{at}: format {out['format']!r} is not one of {', '.join(m.value for m in Method)}")
    if "lora_alpha" in out and (isinstance(out["lora_alpha"], bool) or not isinstance(out["lora_alpha"], (int, float))):
        raise SpecError(f"{at}: lora_alpha must be a number, got {out['lora_alpha']!r}")
    if "lora_r" in out and (isinstance(out["lora_r"], bool) or not isinstance(out["lora_r"], int) or out["lora_r"] < 1):
        raise SpecError(f"{at}: lora_r must be a positive integer, got {out['lora_r']!r}")
    return out


def _adapters(root: Path, where: str, items) -> list[dict]:
    out = []
    for at, item in _entries(where, items, "adapters", "path", ADAPTER_KEYS):
        if ("path" in item) == ("glob" in item):
            raise SpecError(f"{at}: give exactly one of `path` and `glob`")
        common = _read_options(at, item)
        if "head" in item:
            common["head"] = str(_resolve(root, _text(at, item["head"], "head")).absolute())
        if "glob" in item:
            if "name" in item:
                raise SpecError(f"{at}: a glob's adapters are named by their file or folder; drop `name`")
            pattern = str(_resolve(root, _text(at, item["glob"], "glob")))
            matches = sorted(globlib.glob(pattern))
            if not matches:
                raise SpecError(f"{at}: glob {item['glob']!r} matches nothing (looked for {pattern})")
            for m in matches:
                out.append({"name": _name_ok(at, Path(m.rstrip("/")).stem), "path": str(Path(m).absolute()),
                            **common})
        else:
            path = _resolve(root, _text(at, item["path"], "path"))
            if not path.exists():
                raise SpecError(f"{at}: {path}: no such file or folder")
            name = _name_ok(at, str(item.get("name") or Path(str(path).rstrip("/")).stem))
            out.append({"name": name, "path": str(path.absolute()), **common})
    _distinct(where, [a["name"] for a in out], "adapters")
    return out


def _mode(where: str, mode):
    if mode is not None and mode not in MODES:
        raise SpecError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}{did_you_mean(mode, MODES)}")
    return mode


def _targets(root: Path, where: str, items, defaults: dict) -> list[dict]:
    from ..profile import load_profile

    out = []
    for at, item in _entries(where, items, "targets", "target", TARGET_KEYS):
        target = _text(at, item.get("target"), "target")
        if Path(target).suffix in (".yaml", ".yml"):
            target = str(_resolve(root, target).absolute())
        try:
            profile = load_profile(target)
        except LoradeployError as e:
            raise SpecError(f"{at}: {e}") from e
        plan = item.get("plan", defaults.get("plan"))
        if plan is not None:
            from ..quant.plan import UniformPlan, parse_plan_choice
            from ..quantize import uniform_format

            if not isinstance(plan, str) or (Path(plan).suffix == ".json" and not Path(plan).is_absolute()):
                plan = str(_resolve(root, str(plan)).absolute()) if isinstance(plan, str) else plan
            try:
                choice = parse_plan_choice(_text(at, plan, "plan"))
                if isinstance(choice, UniformPlan):
                    uniform_format(profile.runtime, choice.bits)
            except LoradeployError as e:
                raise SpecError(f"{at}: {e}") from e
        mode = _mode(at, item["mode"]) if "mode" in item else defaults.get("mode")
        out.append({"target_name": _name_ok(at, str(item.get("name") or profile.name)), "target": target,
                    "mode": mode, "plan": plan,
                    "slots": item.get("slots", defaults.get("slots"))})
    _distinct(where, [t["target_name"] for t in out], "targets")
    return out


def load_spec(path: Path) -> FleetSpec:
    """Read and check a fleet spec; every unit with its key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw)
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from e
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with base, adapters and targets")
    _unknown(str(path), data, TOP_KEYS)
    if data.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise SpecError(f"{path}: version {data.get('version')!r} is not supported (this loradeploy reads {SPEC_VERSION})")
    for key in ("base", "adapters", "targets"):
        if key not in data:
            raise SpecError(f"{path}: `{key}` is missing")
    _mode(str(path), data.get("mode"))  # here, not at the first target that takes it
    root = path.parent.absolute()
    base = _text(str(path), data["base"], "base")
    if Path(base).suffix or "/" in base:
        base = str(_resolve(root, base).absolute())
    resources = data.get("resources") or {}
    if not isinstance(resources, dict):
        raise SpecError(f"{path}: `resources` must be a mapping")
    _unknown(f"{path}: resources", resources, RESOURCE_KEYS)
    eval_path = str(_resolve(root, _text(str(path), data["eval"], "eval")).absolute()) if data.get("eval") else None
    if eval_path and not Path(eval_path).is_file():
        raise SpecError(f"{path}: eval {eval_path}: no such file")
    adapters = _adapters(root, str(path), data["adapters"])
    targets = _targets(root, str(path), data["targets"], {k: data.get(k) for k in ("mode", "plan", "slots")})
    units = [Unit(adapter=a["name"], path=a["path"], base=base, eval=eval_path, format=a.get("format"),
                  head=a.get("head"), lora_alpha=a.get("lora_alpha"), lora_r=a.get("lora_r"), **t)
             for t in targets for a in adapters]
    keyed = tuple(_with_key(u) for u in units)
    return FleetSpec(path.absolute(), hashlib.sha256(raw).hexdigest(), keyed, resources)


# --- keys ------------------------------------------------------------------------------------

def _tree(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (by relative path)."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _base_files(base: str) -> dict[str, str]:
    from ..base import resolve_base

    folder = resolve_base(base)
    if folder.is_file():
        return {folder.name: file_sha256(folder)}
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model")}


_SOURCE: list[str] = []


def source_sha256() -> str:
    """sha256 over loradeploy's own code and profiles: a changed toolchain is a changed input
    even when its version number is not."""
    if not _SOURCE:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.suffix in (".py", ".yaml") and p.is_file() and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _SOURCE.append(h.hexdigest())
    return _SOURCE[0]


def _versions() -> dict[str, str]:
    from .. import registry
    from ..manifest import CORE_PACKAGES

    out = {"loradeploy": __version__, "loradeploy_source": source_sha256()}
    for dist in dict.fromkeys((*CORE_PACKAGES, *(p for spec in registry.specs() for p in spec.packages))):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def key_inputs(unit: Unit) -> dict:
    """Everything a unit's artifact depends on: its adapter's files, the base's weights, the
    target profile, mode, plan, slots, eval set, and the toolchain's versions."""
    from ..evaldata import DEFAULT_EVAL, DEFAULT_LM_EVAL
    from ..manifest import profile_dict
    from ..profile import load_profile

    plan = unit.plan
    if plan and Path(plan).is_file():
        plan = {"file": file_sha256(Path(plan))}
    evals = [Path(unit.eval)] if unit.eval else [DEFAULT_EVAL, DEFAULT_LM_EVAL]
    return {
        "adapter": _tree(Path(unit.path)), "head": file_sha256(Path(unit.head)) if unit.head else None,
        "read": {"format": unit.format, "lora_alpha": unit.lora_alpha, "lora_r": unit.lora_r},
        "base": _base_files(unit.base), "profile": {k: v for k, v in profile_dict(load_profile(unit.target)).items()
                                                    if k != "source"},
        "mode": unit.mode, "plan": plan, "slots": unit.slots,
        "eval": {p.name: file_sha256(p) for p in evals}, "versions": _versions(),
    }


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _with_key(unit: Unit) -> Unit:
    from dataclasses import replace

    try:
        return replace(unit, key=digest(key_inputs(unit)))
    except OSError as e:
        raise SpecError(f"{unit.path}: cannot read ({e.strerror or e})") from e


def shard(units: tuple[Unit, ...], index: int, count: int) -> tuple[Unit, ...]:
    """Shard ``index`` of ``count``: the units whose id hashes to it (sha256, so a unit stays in
    its shard when others are added or removed; the shards' union is every unit, once)."""
    return tuple(u for u in units if int(hashlib.sha256(u.id.encode()).hexdigest(), 16) % count == index)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 ≤ I < N."""
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise SpecError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. 0/4)")
    return int(i), int(n)
