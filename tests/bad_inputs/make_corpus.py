"""Writes the bad-input corpus: one folder per case under ``cases/`` and ``cases.json``, which
says for each case the command to run, the exit code and a fragment of the one-line error.

Run from the repository root: ``python -m tests.bad_inputs.make_corpus``. Deterministic; the
output is committed so that the corpus is a fixed set of files later issues add to.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.synthetic import make_blora, make_increlora

HERE = Path(__file__).parent
CASES = HERE / "cases"
MARKER = "/tmp/loradeploy-pickle-was-executed"
CATALOGUE: list[dict] = []


def case(name: str, target: str, expect: str, commands=("inspect", "prune"), code: int = 2, **extra):
    """Register a case: ``target`` is relative to the case folder; ``expect`` must appear in
    the error line."""
    CATALOGUE.append({"name": name, "target": target, "expect": expect, "commands": list(commands),
                      "exit_code": code, **extra})
    return CASES / name


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _tiny_sora(folder: Path):
    """Two-module SoRA adapter (small files) for the corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for m in ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"):
        sd[f"{m}.lora.lora_A"] = torch.randn(4, 384, generator=g)
        sd[f"{m}.lora.lora_B"] = torch.randn(384, 4, generator=g)
        sd[f"{m}.lora.gate"] = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    return sd


def build() -> None:
    shutil.rmtree(CASES, ignore_errors=True)
    CASES.mkdir(parents=True)

    d = case("truncated_safetensors", "model.safetensors", "truncated safetensors")
    sd = _tiny_sora(d)
    save_file(sd, str(d / "model.safetensors"))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    d = case("corrupt_safetensors_header", "model.safetensors", "corrupt or truncated safetensors")
    d.mkdir()
    header = b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]'  # unclosed JSON
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)

    d = case("truncated_pickle", "pytorch_model.bin", "corrupt or truncated PyTorch file")
    torch.save(_tiny_sora(d), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) * 2 // 3])

    d = case("malicious_pickle", "pytorch_model.bin", "refused to unpickle", marker=MARKER)
    sd = _tiny_sora(d)
    sd["payload"] = _Exploit()
    torch.save(sd, d / "pytorch_model.bin")

    d = case("pickle_non_tensor_entry", "pytorch_model.bin", "is not a tensor")
    sd = _tiny_sora(d)
    sd["step"] = 1234
    torch.save(sd, d / "pytorch_model.bin")

    d = case("pickle_not_a_dict", "pytorch_model.bin", "expected a non-empty dict of tensors")
    d.mkdir()
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")

    d = case("empty_file", "model.safetensors", "empty file")
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")

    d = case("gguf_as_adapter", "adapter.gguf", "a GGUF file")
    d.mkdir()
    (d / "adapter.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 32)

    d = case("json_as_weights", "model.safetensors", "a JSON file")
    d.mkdir()
    (d / "model.safetensors").write_text('{"not": "tensors"}')

    d = case("random_bytes", "pytorch_model.bin", "not a tensor file")
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(bytes(range(7, 200)))

    d = case("sora_missing_gate", "", "missing gate")
    sd = _tiny_sora(d)
    del sd["encoder.layer.0.attention.self.value.lora.gate"]
    save_file(sd, str(d / "model.safetensors"))

    d = case("sora_gate_length_mismatch", "", "gate has 3 entries")
    sd = _tiny_sora(d)
    sd["encoder.layer.0.attention.self.query.lora.gate"] = torch.ones(1, 3)
    save_file(sd, str(d / "model.safetensors"))

    d = case("sora_rank_mismatch_within_module", "", "rank mismatch")
    sd = _tiny_sora(d)
    sd["encoder.layer.0.attention.self.query.lora.lora_B"] = torch.randn(384, 5)
    save_file(sd, str(d / "model.safetensors"))

    d = case("sora_nan", "", "NaN/Inf")
    sd = _tiny_sora(d)
    sd["encoder.layer.0.attention.self.query.lora.lora_A"][0, 3] = float("nan")
    save_file(sd, str(d / "model.safetensors"))

    d = case("sora_lora_r_mismatch", "", "lora_r is 8 but its tensors have rank 4")
    save_file(_tiny_sora(d), str(d / "model.safetensors"))
    (d / "lora_config.json").write_text('{"lora_r": 8, "lora_alpha": 16}')

    d = case("sora_all_gates_zero", "", "every module has ΔW = 0", commands=["prune"])
    sd = _tiny_sora(d)
    for k in sd:
        if k.endswith("gate"):
            sd[k] = torch.zeros_like(sd[k])
    save_file(sd, str(d / "model.safetensors"))

    d = case("blora_inf", "", "NaN/Inf")
    make_blora(d)
    from safetensors.torch import load_file
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B"))
    sd[key][1, 0] = float("inf")
    save_file(sd, str(d / "adapter_model.safetensors"))

    d = case("blora_gamma2_wrong_length", "", "rank gates gamma_2 have 3 entries")
    make_blora(d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("gamma_2"))
    sd[key] = torch.zeros(3)
    save_file(sd, str(d / "adapter_model.safetensors"))

    d = case("increlora_shape_mismatch", "", "do not stack")
    make_increlora(d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    key = next(k for k in sd if k.endswith("intermediate.dense.lora_A.1"))
    sd[key] = torch.randn(1, 100)
    torch.save(sd, d / "pytorch_model.bin")

    d = case("increlora_missing_E_entry", "", "missing lora_E")
    make_increlora(d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    for k in [k for k in sd if ".value.lora_E." in k]:
        del sd[k]
    torch.save(sd, d / "pytorch_model.bin")

    d = case("increlora_list_gap", "", "entries are not 0..")
    make_increlora(d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    for role in "ABE":
        del sd[f"bert.encoder.layer.1.output.dense.lora_{role}.1"]
    torch.save(sd, d / "pytorch_model.bin")

    d = case("increlora_no_alpha", "", "without lora_alpha")
    make_increlora(d)
    (d / "config.json").unlink()

    d = case("increlora_ranknum_nan", "", "must be a positive number")
    make_increlora(d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["bert.encoder.layer.0.attention.self.query.ranknum"] = torch.tensor([float("nan")])
    torch.save(sd, d / "pytorch_model.bin")

    d = case("peft_without_config", "", "no adapter_config.json")
    d.mkdir()
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(2, 384),
               "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(384, 2)},
              str(d / "adapter_model.safetensors"))

    d = case("peft_unknown_type", "", "peft_type 'PROMPT_TUNING' is not supported")
    d.mkdir()
    save_file({"prompt_embeddings": torch.randn(4, 384)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')

    d = case("peft_config_not_json", "", "not valid JSON")
    d.mkdir()
    save_file({"x": torch.randn(2)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text("{peft_type: LORA")

    d = case("peft_empty_adapter", "", "no LoRA modules")
    d.mkdir()
    save_file({"base_model.model.classifier.weight": torch.randn(2, 384)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')

    d = case("peft_dora", "", "DoRA adapters (use_dora) are not supported")
    d.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.randn(2, 8),
               "base_model.model.q.lora_B.weight": torch.randn(8, 2)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}')

    d = case("unknown_layout", "", "unknown layout")
    d.mkdir()
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(d / "model.safetensors"))

    d = case("empty_folder", "", "no adapter weights in this folder")
    d.mkdir()
    (d / ".keep").write_text("")

    case("missing_path", "does-not-exist", "no such file or directory")

    d = case("sora_head_without_head_tensors", "", "no head tensors", commands=["inspect"],
             extra_args=["--head", "{case}/not_a_head.safetensors"])
    save_file(_tiny_sora(d), str(d / "model.safetensors"))
    save_file({"foo.weight": torch.randn(2, 2)}, str(d / "not_a_head.safetensors"))

    (HERE / "cases.json").write_text(json.dumps(CATALOGUE, indent=1) + "\n")


if __name__ == "__main__":
    build()
    print(f"{len(CATALOGUE)} cases written to {CASES}")
