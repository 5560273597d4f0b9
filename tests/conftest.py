import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `fleet run` hands its run to a resident worker answering on this socket: tests never reach a
# worker the developer started; those that want one start their own on it
os.environ["LORADEPLOY_FLEET_SOCKET"] = os.path.join(tempfile.mkdtemp(prefix="ld-test-"), "fleet.sock")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ADAPTERS = REPO / "examples" / "adapters"

#: what :func:`quick_profile` changes in a built-in profile: one short timing run (tests time nothing)
QUICK_TIMING = {"warmup": 0, "runs": 1, "shapes": [{"batch": 1, "seq": 16}]}


def quick_profile(folder: Path, name: str, *, latency_budget: bool = False, filename: str | None = None,
                  **overrides) -> Path:
    """The built-in profile ``name`` written to ``folder`` (as ``filename``, default
    ``<name>.yaml``) with :data:`QUICK_TIMING`, then ``overrides``, applied to its top-level
    keys (an override of ``None`` keeps the built-in's value), and without its
    ``latency_p95_ms`` budget unless ``latency_budget``."""
    import yaml

    from loradeploy.profile import BUILTIN_DIR

    data = yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text())
    data.update({k: v for k, v in {**QUICK_TIMING, **overrides}.items() if v is not None})
    if not latency_budget:
        data["budgets"] = {k: v for k, v in (data.get("budgets") or {}).items() if k != "latency_p95_ms"}
    path = Path(folder) / (filename or f"{name}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from loradeploy.base import resolve_base

    return resolve_base("minilm")


def lm_eval_head(folder: Path, n: int) -> Path:
    """The first ``n`` of the shipped LM eval texts, as ``folder/eval.txt`` (Gemma validations
    on fewer texts: each reference and runtime pass costs seconds per text here)."""
    from loradeploy.evaldata import DEFAULT_LM_EVAL

    path = Path(folder) / "eval.txt"
    path.write_text("\n".join(DEFAULT_LM_EVAL.read_text().splitlines()[:n]) + "\n")
    return path


@pytest.fixture(scope="session")
def gemma_pair_art(tmp_path_factory) -> tuple[Path, dict]:
    """Gemma 3 270M on llama.cpp (``gguf-cpu``, swappable) with the two shipped Gemma adapters,
    ``sora`` and ``increlora``: exported once for the tests that check switching and serving
    (each Gemma export takes minutes here), validated on the first 24 of the 64 shipped LM eval
    texts (about 900 tokens). Returns the artifact folder and its manifest."""
    from loradeploy.job import AdapterSpec
    from tests.exports import export_adapters

    folder = tmp_path_factory.mktemp("gemma-pair")
    specs = [AdapterSpec("sora", EXAMPLE_ADAPTERS / "sora-gemma"),
             AdapterSpec("increlora", EXAMPLE_ADAPTERS / "increlora-gemma")]
    profile = quick_profile(folder, "gguf-cpu", runs=2, shapes=[{"batch": 1, "seq": 32}])
    record = export_adapters("gemma3-270m", specs, profile, folder / "art", eval_path=lm_eval_head(folder, 24))
    return folder / "art", record


_PROGRESS_LINE = __import__("re").compile(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d+s\] ")


def error_text(err: str) -> str:
    """stderr without the timestamped progress lines a command prints when stderr is not a
    terminal (loradeploy.render.progress_steps): what is left is the error, if any."""
    return "\n".join(line for line in err.strip().splitlines() if not _PROGRESS_LINE.match(line))
