"""Target profiles: one YAML file per target (runtime, precision, adapter mode, benchmark
shapes, budgets), validated on load. Built-in profiles live in the repository's ``targets/``;
users add their own by path or through ``LORADEPLOY_TARGETS`` (folders, ``:``-separated)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from . import registry
from .errors import LoradeployError, ProfileError
from .kinds import MODES
from .slots import DEFAULT as DEFAULT_SLOTS, parse as slot_tokens

PROFILE_VERSION = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "targets" / "profiles"


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"b{self.batch}xs{self.seq}"


@dataclass(frozen=True)
class Budgets:
    """Thresholds the validation holds each measure against (None: not checked)."""

    label_agreement_min: float | None = field(default=None, metadata={"help": "classifier: fraction of eval inputs with the reference's label"})
    max_abs_logit_max: float | None = field(default=None, metadata={"help": "classifier: max |Δlogit| vs the fp32 reference"})
    mean_abs_logit_max: float | None = field(default=None, metadata={"help": "classifier: mean |Δlogit|"})
    accuracy_drop_max: float | None = field(default=None, metadata={"help": "task accuracy may drop at most this (absolute)"})
    cosine_min: float | None = field(default=None, metadata={"help": "embeddings: min cosine similarity to the reference"})
    kl_mean_max: float | None = field(default=None, metadata={"help": "LM: mean per-token KL divergence"})
    top1_agreement_min: float | None = field(default=None, metadata={"help": "LM: per-token top-1 agreement"})
    kl_excess_vs_base_max: float | None = field(default=None, metadata={"help": "LM: adapter's mean KL minus the base alone's (the adapter's own share)"})
    top1_drop_vs_base_max: float | None = field(default=None, metadata={"help": "LM: base alone's top-1 agreement minus the adapter's"})
    greedy_match_min: float | None = field(default=None, metadata={"help": "LM: share of eval prompts whose first 32 greedy tokens equal the reference's"})
    ppl_ratio_max: float | None = field(default=None, metadata={"help": "LM: the artifact's perplexity over the reference's"})
    adapter_effect_kept_min: float | None = field(default=None, metadata={"help": "classifier, LM: 1 − the artifact's error over the adapter's effect (> 0: closer to the adapter's reference than the base alone)"})
    latency_p95_ms: dict[str, float] = field(default_factory=dict, metadata={"help": "shape label → p95 ms"})
    artifact_mb_max: float | None = field(default=None, metadata={"help": "size of the artifact folder"})


@dataclass(frozen=True)
class TargetProfile:
    name: str
    runtime: str
    precision: str
    mode: str = "swappable"
    description: str = ""
    options: dict = field(default_factory=dict)  # the runtime's own keys (RuntimeSpec.options), defaults filled in
    threads: int = 0
    plan: str | None = None  # swappable adapters' precision plan: "learned" or "uniform:BITS" (None: as trained)
    slots: str = DEFAULT_SLOTS  # swappable graphs: which modules and norms are inputs (see loradeploy.slots)
    shapes: tuple[Shape, ...] = (Shape(1, 128), Shape(8, 128))
    warmup: int = 3
    runs: int = 20
    budgets: Budgets = Budgets()
    allow_ungated: bool = False  # a validation no budget applies to may pass (else it fails: nothing gated)
    source: str = ""
    version: int = PROFILE_VERSION



def _fail(path, message: str):
    raise ProfileError(f"{path}: {message}")


def _check_keys(path, where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        _fail(path, f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")


def _budgets(path, data) -> Budgets:
    if not isinstance(data, dict):
        _fail(path, "budgets must be a mapping")
    names = {f.name for f in fields(Budgets)}
    _check_keys(path, "budgets", data, names)
    data = {k: v for k, v in data.items() if v is not None}
    for key, value in data.items():
        if key == "latency_p95_ms":
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
                _fail(path, "budgets.latency_p95_ms must map shape labels (e.g. b1xs128) to positive ms")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(path, f"budgets.{key} must be a number, got {value!r}")
    return Budgets(**data)


def _shapes(path, data) -> tuple[Shape, ...]:
    if not isinstance(data, list) or not data:
        _fail(path, "shapes must be a non-empty list of {batch, seq}")
    shapes = []
    for item in data:
        if not isinstance(item, dict) or set(item) != {"batch", "seq"} or not all(
                isinstance(v, int) and v > 0 for v in item.values()):
            _fail(path, f"bad shape {item!r}: expected {{batch: N, seq: N}} with positive integers")
        shapes.append(Shape(item["batch"], item["seq"]))
    return tuple(shapes)


def parse_profile(path: Path, data, recorded: bool = False) -> TargetProfile:
    """Validate ``data`` (a YAML document) into a :class:`TargetProfile`. The keys only one runtime
    knows (its :attr:`RuntimeSpec.options`) are written at the top level and kept in ``options``.
    ``recorded``: ``data`` is a manifest's record of a profile, which before the runtimes had
    their own option schemas held every runtime's options: the other runtimes' are dropped."""
    if not isinstance(data, dict):
        _fail(path, "a target profile must be a YAML mapping")
    for key in ("name", "runtime", "precision"):
        if key not in data:
            _fail(path, f"missing required key {key!r}")
    runtime = data["runtime"]
    if runtime not in registry.names():
        _fail(path, f"runtime {runtime!r} is not one of {', '.join(registry.names())}")
    own = {o.name: o for o in registry.get(runtime).options}
    data = dict(data)
    if recorded:
        for key in [k for spec in registry.specs() for k in (o.name for o in spec.options) if k not in own]:
            data.pop(key, None)
    allowed = ({f.name for f in fields(TargetProfile)} - {"source", "options"}) | set(own)
    _check_keys(path, "the profile", data, allowed)
    if data.get("version", PROFILE_VERSION) != PROFILE_VERSION:
        _fail(path, f"profile version {data['version']} is not supported (expected {PROFILE_VERSION})")
    precisions = registry.get(runtime).precisions
    if data["precision"] not in precisions:
        _fail(path, f"precision {data['precision']!r} is not one of {', '.join(precisions)} for {runtime}")
    if data.get("mode", "swappable") not in MODES:
        _fail(path, f"mode {data['mode']!r} is not one of {', '.join(MODES)}")
    plan = data.get("plan")
    if plan is not None and not (plan == "learned" or (isinstance(plan, str) and plan.startswith("uniform:")
                                                       and plan.split(":", 1)[1].isdigit())):
        _fail(path, f"plan must be 'learned' or 'uniform:BITS' (e.g. uniform:8), got {plan!r}")
    if "slots" in data:
        if not isinstance(data["slots"], str):
            _fail(path, "slots must be a string such as 'blocks' or 'adapters,pooler.dense'")
        try:
            slot_tokens(data["slots"])
        except LoradeployError as e:
            _fail(path, str(e))
    if "allow_ungated" in data and not isinstance(data["allow_ungated"], bool):
        _fail(path, "allow_ungated must be true or false")
    options = {}
    for name, option in own.items():
        options[name] = data.pop(name, option.default)
        if option.problem(options[name]):
            _fail(path, f"{option.problem(options[name])} ({runtime}'s own option)")
    for key in ("threads", "warmup", "runs"):
        if key in data and (not isinstance(data[key], int) or data[key] < 0):
            _fail(path, f"{key} must be a non-negative integer")
    values = dict(data)
    if "shapes" in values:
        values["shapes"] = _shapes(path, values["shapes"])
    if "budgets" in values:
        values["budgets"] = _budgets(path, values["budgets"])
    return TargetProfile(**values, options=options, source=str(path))


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LORADEPLOY_TARGETS", "").split(":") if p]
    return [*extra, BUILTIN_DIR]


def profile_paths() -> dict[str, Path]:
    """Every known profile name → its file (earlier search folders win)."""
    found: dict[str, Path] = {}
    for folder in reversed(_search_dirs()):
        for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found[p.stem] = p
    return found


def load_profile(name_or_path: str) -> TargetProfile:
    """A profile by name (see :func:`profile_paths`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        known = profile_paths()
        if name_or_path not in known:
            import difflib

            close = difflib.get_close_matches(name_or_path, list(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ProfileError(f"unknown target {name_or_path!r}: {hint}(known: {', '.join(sorted(known))}; "
                               "or give a path to a .yaml profile)")
        path = known[name_or_path]
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        _fail(path, f"cannot read YAML ({str(e).splitlines()[0]})")
    return parse_profile(path, data)
