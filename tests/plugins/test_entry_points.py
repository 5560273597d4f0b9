"""A runtime from another distribution: registered through the entry-point group
``loradeploy.plugins`` (an installed distribution's ``entry_points.txt``, read by
``importlib.metadata`` in a fresh process), it exports and verifies with loradeploy's own CLI
without loradeploy naming it anywhere."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from loradeploy import registry

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _install_toy_plugin(site: Path) -> None:
    """What ``pip install toyrt`` leaves in site-packages: the package and its dist-info."""
    shutil.copytree(HERE / "toyrt", site / "toyrt", ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "toyrt-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyrt\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntorch-eager = toyrt\n")


def _cli(*argv: str, path: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*path, REPO])}
    return subprocess.run([sys.executable, "-m", "loradeploy.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_plugin_registered_by_entry_point_exports_and_verifies(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_toy_plugin(site)
    profile = tmp_path / "torch-eager.yaml"
    profile.write_text(yaml.safe_dump({
        "version": 1, "name": "torch-eager", "description": "PyTorch eager, merged (a plugin from elsewhere)",
        "runtime": "torch-eager", "precision": "fp32", "mode": "merged", "shapes": [{"batch": 1, "seq": 16}],
        "warmup": 0, "runs": 1, "budgets": {"label_agreement_min": 0.99, "accuracy_drop_max": 0.01}}))
    lines = (REPO / "examples" / "data" / "sentiment" / "eval.jsonl").read_text().splitlines()[:24]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    export = ["export", "--base", "minilm", "--adapter", str(REPO / "examples" / "adapters" / "sora"),
              "--target", str(profile), "--eval", str(tmp_path / "eval.jsonl")]

    # without the distribution installed, the runtime is unknown: the registration is what finds it
    bare = _cli(*export, "-o", str(tmp_path / "bare"), path=[])
    assert bare.returncode == 2 and "torch-eager" in bare.stderr and not (tmp_path / "bare").exists(), bare.stderr

    art = tmp_path / "art"
    proc = _cli(*export, "-o", str(art), path=[site])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"]["runtime"] == "torch-eager" and manifest["environment"]["versions"]["toyrt"] == "0.1"
    checks = {c["measure"]: c for c in manifest["validation"]["checks"]}
    assert checks["label_agreement"]["status"] == "PASS" and checks["label_agreement"]["value"] == 1.0
    assert (art / "model.safetensors").is_file()

    ok = _cli("verify", str(art), "--json", path=[site])
    record = json.loads(ok.stdout)
    assert ok.returncode == 0 and record["loaded"] and record["problems"] == [], ok.stdout + ok.stderr

    from tests.support.tamper import flip_byte

    flip_byte(art / "model.safetensors")
    bad = _cli("verify", str(art), path=[site])
    assert bad.returncode == 1 and "model.safetensors" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
