import json

from loradeploy.cli import main
from tests.synthetic import make_blora, make_sora


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "prune" in out


def test_inspect_json(tmp_path, capsys):
    syn = make_blora(tmp_path / "b")
    assert main(["inspect", str(syn.path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "blora"
    ranks = {m["name"]: (m["rank_before"], m["rank_after"]) for m in record["modules"]}
    assert ranks == {n: (8, live) for n, live in syn.live_ranks.items()}
    assert record["totals"]["exact"] is True
    assert record["sources"][0]["sha256"]


def test_inspect_table(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    assert main(["inspect", str(syn.path)]) == 0
    out = capsys.readouterr().out
    assert "format: sora" in out and "rank 40 → 20" in out


def test_prune_writes_peft_folder(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["prune", str(syn.path), "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "prune_report.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {
        n: r for n, r in syn.live_ranks.items() if r}
    assert record["totals"]["rank_after"] == sum(syn.live_ranks.values())
    # the output is itself a readable adapter, with nothing left to prune
    assert main(["inspect", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["method"] == "peft-lora" and again["totals"]["rank_before"] == again["totals"]["rank_after"]


def test_prune_overwrite(tmp_path, capsys):
    syn = make_sora(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["prune", str(syn.path), "-o", str(out)]) == 0
    assert main(["prune", str(syn.path), "-o", str(out)]) == 2
    assert main(["prune", str(syn.path), "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s"]
