"""Helpers of tests/test_fuzz.py: valid seed files of every kind loradeploy reads, hypothesis
strategies that damage them (truncations, bit flips, edited headers and lengths), and one
in-process run of the CLI with everything it prints captured, a 10 s limit and a check that
nothing was written outside its temporary folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from loradeploy import manifest as mf
from loradeploy.cli import main
from tests.support.cli import assert_bad_input, error_text

CASE_SECONDS = 10.0
#: cases run, by tier → file kind → outcome (printed at the end of tests/test_fuzz.py)
COUNTS: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
TIMES: dict[str, float] = {}
CASE_TIMES: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # seconds inside main()


# --- seeds -----------------------------------------------------------------------------------

@dataclass
class ReaderSeed:
    """A valid checkpoint folder and the file in it that a case damages."""

    kind: str
    folder: Path
    file: str  # relative to folder
    target: str  # what the command is given, relative to folder ("" = the folder)


@dataclass
class Artifact:
    folder: Path
    files: dict[str, str] = field(default_factory=dict)  # file kind → path relative to folder


def _peft_adalora(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tests.support.synthetic import MODULES

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, (o, i) in list(MODULES.items())[:3]:
        sd[f"base_model.model.{name}.lora_A"] = torch.randn(6, i, generator=g) * 0.05
        sd[f"base_model.model.{name}.lora_E"] = torch.tensor([[1.0], [0.0], [0.3], [0.0], [2.0], [0.0]])
        sd[f"base_model.model.{name}.lora_B"] = torch.randn(o, 6, generator=g) * 0.05
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADALORA", "r": 6, "init_r": 6, "target_r": 3, "lora_alpha": 12, "task_type": "SEQ_CLS",
         "target_modules": ["query", "value", "dense"], "alpha_pattern": {}, "rank_pattern": None}))


def write_gguf_adapter(path: Path) -> None:
    """A tiny llama.cpp LoRA adapter GGUF, as the gguf target writes one."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)
    w.add_array("general.tags", ["fuzz", "seed"])
    g = np.random.default_rng(0)
    for layer in range(2):
        w.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", g.standard_normal((4, 64)).astype(np.float32))
        w.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", g.standard_normal((64, 4)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_onnx(path: Path) -> None:
    """A tiny classifier graph with the artifact's inputs (input_ids, attention_mask) and one
    overridable weight ``W`` that an .onnx_adapter replaces: logits = mean(ids · mask) @ W."""
    import onnx
    from onnx import TensorProto, helper

    W = helper.make_tensor("W", TensorProto.FLOAT, [1, 2], [0.1, -0.1])
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
             helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=1),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "fuzz",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [W])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


#: the synthetic adapters' modules, shrunk: small files put more of the damage in headers and
#: structure, and keep a case to milliseconds (readers need no base model)
SMALL_MODULES = {"bert.encoder.layer.0.attention.self.query": (24, 24),
                 "bert.encoder.layer.0.attention.self.value": (24, 24),
                 "bert.encoder.layer.1.intermediate.dense": (48, 24),
                 "bert.encoder.layer.5.attention.output.dense": (24, 24)}


def build_reader_seeds(root: Path) -> dict[str, ReaderSeed]:
    """One valid checkpoint per layout and file kind the readers take."""
    from unittest import mock

    from tests.support import synthetic

    assert synthetic.DEAD_MODULE in SMALL_MODULES
    with mock.patch.dict(synthetic.MODULES, SMALL_MODULES, clear=True):
        return _build_reader_seeds(root)


def _build_reader_seeds(root: Path) -> dict[str, ReaderSeed]:
    import torch

    from tests.support.synthetic import make_blora, make_increlora, make_sora

    seeds: dict[str, ReaderSeed] = {}
    make_sora(root / "sora-st", fmt="safetensors")
    seeds["sora model.safetensors"] = ReaderSeed("sora model.safetensors", root / "sora-st", "model.safetensors", "")
    seeds["sora head.safetensors"] = ReaderSeed("sora head.safetensors", root / "sora-st", "head.safetensors", "")
    seeds["sora lora_config.json"] = ReaderSeed("sora lora_config.json", root / "sora-st", "lora_config.json", "")
    make_sora(root / "sora-bin", fmt="bin")
    seeds["sora pytorch_model.bin (zip)"] = ReaderSeed("sora pytorch_model.bin (zip)", root / "sora-bin",
                                                       "pytorch_model.bin", "")
    legacy = root / "sora-legacy"
    legacy.mkdir()
    sd = torch.load(root / "sora-bin" / "pytorch_model.bin", weights_only=True)
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    seeds["sora pytorch_model.bin (legacy pickle)"] = ReaderSeed("sora pytorch_model.bin (legacy pickle)", legacy,
                                                                 "pytorch_model.bin", "pytorch_model.bin")
    make_increlora(root / "increlora")
    seeds["increlora pytorch_model.bin"] = ReaderSeed("increlora pytorch_model.bin", root / "increlora",
                                                      "pytorch_model.bin", "")
    seeds["increlora config.json"] = ReaderSeed("increlora config.json", root / "increlora", "config.json", "")
    make_blora(root / "blora")
    seeds["blora adapter_model.safetensors"] = ReaderSeed("blora adapter_model.safetensors", root / "blora",
                                                          "adapter_model.safetensors", "")
    seeds["blora adapter_config.json"] = ReaderSeed("blora adapter_config.json", root / "blora",
                                                    "adapter_config.json", "")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prune", str(root / "sora-st"), "-o", str(root / "peft"), "--json"]) == 0
    (root / "peft" / "prune_report.json").unlink()
    seeds["peft adapter_model.safetensors"] = ReaderSeed("peft adapter_model.safetensors", root / "peft",
                                                         "adapter_model.safetensors", "")
    seeds["peft adapter_config.json"] = ReaderSeed("peft adapter_config.json", root / "peft",
                                                   "adapter_config.json", "")
    _peft_adalora(root / "adalora")
    seeds["adalora adapter_model.safetensors"] = ReaderSeed("adalora adapter_model.safetensors", root / "adalora",
                                                            "adapter_model.safetensors", "")
    seeds["adalora adapter_config.json"] = ReaderSeed("adalora adapter_config.json", root / "adalora",
                                                      "adapter_config.json", "")
    other = root / "other"
    other.mkdir()
    write_gguf_adapter(other / "adapter.gguf")
    seeds["gguf given as adapter"] = ReaderSeed("gguf given as adapter", other, "adapter.gguf", "adapter.gguf")
    art = build_mini_artifact(root / "mini-art-for-readers")
    shutil.copy(art.folder / "adapters" / "sora.onnx_adapter", other / "sora.onnx_adapter")
    seeds["onnx_adapter given as adapter"] = ReaderSeed("onnx_adapter given as adapter", other,
                                                        "sora.onnx_adapter", "sora.onnx_adapter")
    checked = set()
    for seed in seeds.values():  # every seed reads as it is
        if (seed.folder, seed.target) in checked:
            continue
        checked.add((seed.folder, seed.target))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["inspect", str(seed.folder / seed.target), "--json"])
        assert code == (2 if "given as adapter" in seed.kind else 0), seed
    return seeds


def build_mini_artifact(folder: Path) -> Artifact:
    """A small onnxruntime artifact that ``verify`` accepts and loads in milliseconds: the tiny
    graph, its .onnx_adapter, a GGUF adapter, a PEFT folder (safetensors + JSON) and tokenizer
    JSON, listed in a manifest modelled on examples/ci/baseline/manifest.json."""
    from loradeploy.plugins.onnxruntime.adapter_tensors import write_adapter_file

    from tests.support.paths import REPO

    (folder / "adapters" / "peft").mkdir(parents=True)
    write_tiny_onnx(folder / "model.onnx")
    write_adapter_file({"W": np.array([[0.5, -0.25]], np.float32)}, folder / "adapters" / "sora.onnx_adapter")
    write_gguf_adapter(folder / "adapters" / "extra.gguf")
    from safetensors.numpy import save_file

    g = np.random.default_rng(1)
    save_file({"base_model.model.q.lora_A.weight": g.standard_normal((2, 8)).astype(np.float32),
               "base_model.model.q.lora_B.weight": g.standard_normal((8, 2)).astype(np.float32)},
              str(folder / "adapters" / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapters" / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]"}))
    m = json.loads((REPO / "examples" / "ci" / "baseline" / "manifest.json").read_text())
    m["adapters"] = [{**m["adapters"][0], "name": "sora", "file": "adapters/sora.onnx_adapter"}]
    m["num_labels"] = 2
    m["files"] = [{"path": p.relative_to(folder).as_posix(), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                   "bytes": p.stat().st_size} for p in sorted(folder.rglob("*")) if p.is_file()]
    (folder / "manifest.json").write_text(json.dumps(mf.sealed(m), indent=2) + "\n")
    return Artifact(folder, {"model.onnx": "model.onnx", "onnx_adapter": "adapters/sora.onnx_adapter",
                             "gguf": "adapters/extra.gguf", "safetensors": "adapters/peft/adapter_model.safetensors",
                             "adapter_config.json": "adapters/peft/adapter_config.json",
                             "tokenizer_config.json": "tokenizer_config.json", "manifest.json": "manifest.json"})


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- mutations -------------------------------------------------------------------------------

INTERESTING_U64 = [0, 1, 2, 7, 8, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1,
                   2**63, 2**64 - 1]
INTERESTING_U32 = [0, 1, 2, 3, 4, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


@st.composite
def byte_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Damage to any file: truncate, flip bits, overwrite, insert, delete, duplicate, zero."""
    n = len(data)
    op = draw(st.sampled_from(["truncate", "flip", "flip", "overwrite", "insert", "delete", "duplicate",
                               "zero-range", "append", "empty"]))
    pos = draw(st.integers(0, max(n - 1, 0)))
    if op == "empty":
        return op, b""
    if op == "truncate":
        cut = draw(st.one_of(st.integers(0, n), st.integers(max(n - 64, 0), n), st.integers(0, min(n, 64))))
        return f"truncate to {cut}", data[:cut]
    if op == "flip":
        buf = bytearray(data)
        k = draw(st.integers(1, 8))
        where = draw(st.lists(st.one_of(st.integers(0, max(n - 1, 0)), st.integers(0, min(n, 128) - 1)),
                              min_size=k, max_size=k))
        bits = draw(st.lists(st.integers(0, 7), min_size=k, max_size=k))
        for w, b in zip(where, bits):
            buf[w] ^= 1 << b
        return f"flip bits at {where}", bytes(buf)
    if op == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=32))
        return f"overwrite at {pos}", data[:pos] + junk + data[pos + len(junk):]
    if op == "insert":
        junk = draw(st.binary(min_size=1, max_size=32))
        return f"insert at {pos}", data[:pos] + junk + data[pos:]
    if op == "delete":
        k = draw(st.integers(1, 64))
        return f"delete {k} at {pos}", data[:pos] + data[pos + k:]
    if op == "duplicate":
        k = draw(st.integers(1, 256))
        return f"duplicate {k} at {pos}", data[:pos + k] + data[pos:]
    if op == "zero-range":
        k = draw(st.integers(1, 4096))
        end = min(n, pos + k)
        return f"zero {pos}:{end}", data[:pos] + b"\0" * (end - pos) + data[end:]
    junk = draw(st.binary(min_size=1, max_size=64))
    return "append", data + junk


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["", "LORA", "BLORA", "ADALORA", "onnxruntime",
                                                                 "llama.cpp", "../../x", "/etc/passwd", "[bold]x[/]",
                                                                 "sequence-classification", "causal-lm"]),
                         st.sampled_from([0, -1, 1, 1e-320, 1e308, 2**63, 0.5]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                 st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                           max_leaves=12)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def _delete(doc, path):
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return doc


@st.composite
def json_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Edit a JSON document: change a value's type or value, delete or add a key, replace the
    whole document, nest it deeply, or damage its text."""
    doc = json.loads(data)
    op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "replace", "deep", "text", "literal"]))
    paths = [p for p, _ in _paths(doc)]
    if op == "set":
        path = draw(st.sampled_from(paths))
        doc = _set(doc, path, draw(JSON_VALUES))
        desc = f"set {list(path)}"
    elif op == "delete" and len(paths) > 1:
        path = draw(st.sampled_from(paths[1:]))
        doc = _delete(doc, path)
        desc = f"delete {list(path)}"
    elif op == "add":
        dicts = [p for p, v in _paths(doc) if isinstance(v, dict)] or [()]
        path = draw(st.sampled_from(dicts))
        key = draw(st.one_of(st.text(max_size=10), st.sampled_from(["lora_r", "lora_alpha", "r", "peft_type",
                                                                     "use_dora", "prune_rank", "init_r"])))
        target = doc
        for p in path:
            target = target[p]
        if isinstance(target, dict):
            target[key] = draw(JSON_VALUES)
        desc = f"add {key!r} under {list(path)}"
    elif op == "replace":
        doc = draw(JSON_VALUES)
        desc = "replace the document"
    elif op == "deep":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        return f"nest {depth} deep", b"[" * depth + json.dumps(doc).encode() + b"]" * depth
    elif op == "literal":
        text = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "null", "\"\\ud800\"",
                                     "9" * 5000, "[]", "{}", "\"\"", "0"]))
        path = draw(st.sampled_from(paths))
        if not path:
            return f"document {text[:12]}", text.encode()
        marker = "\u2603FUZZ\u2603"
        doc = _set(doc, path, marker)
        return f"literal {text[:12]} at {list(path)}", json.dumps(doc).replace(json.dumps(marker), text).encode()
    else:
        desc, out = draw(byte_mutation(json.dumps(doc).encode()))
        return f"json text: {desc}", out
    try:
        return desc, json.dumps(doc, allow_nan=True).encode()
    except (TypeError, ValueError):
        return desc, data


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "U64", "C64", "Q4", "", 3, None]


@st.composite
def safetensors_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Edit a safetensors file's header length or its JSON header (dtype, shape, offsets,
    entries, metadata), keeping the rest; or damage its bytes."""
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    body = data[8 + hlen:]
    op = draw(st.sampled_from(["length", "dtype", "shape", "offsets", "drop", "rename", "metadata", "header-json",
                               "bytes", "bytes"]))
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    if op == "length":
        new = draw(st.one_of(st.sampled_from(INTERESTING_U64), st.integers(max(hlen - 16, 0), hlen + 16)))
        return f"header length {hlen} → {new}", struct.pack("<Q", new) + data[8:]
    if op == "bytes":
        return draw(byte_mutation(data))
    if op == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES))
        desc = f"{name} dtype {header[name]['dtype']!r}"
    elif op == "shape":
        header[name]["shape"] = draw(st.one_of(
            st.lists(st.integers(0, 5000), max_size=4), st.lists(st.sampled_from([-1, 2**40, 2**63, 0]), max_size=3),
            JSON_VALUES))
        desc = f"{name} shape {header[name]['shape']!r}"
    elif op == "offsets":
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = draw(st.one_of(
            st.tuples(st.integers(0, len(body) + 8), st.integers(0, len(body) + 8)).map(list),
            st.just([start, end + 4]), st.just([start + 4, end]), st.just([end, start]), JSON_VALUES))
        desc = f"{name} data_offsets {header[name]['data_offsets']!r}"
    elif op == "drop":
        del header[name]
        desc = f"drop {name}"
    elif op == "rename":
        new = draw(st.one_of(st.text(max_size=30), st.just(name + ".lora_A"), st.just(name.replace("lora_A", "lora_B")),
                             st.just(name.replace("gate", "lora_A")), st.just(name.replace(".lora_", ".lora_E."))))
        header[new] = header.pop(name)
        desc = f"rename {name} → {new!r}"
    elif op == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
        desc = "metadata"
    else:
        header = draw(JSON_VALUES)
        desc = "header replaced"
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * draw(st.integers(0, 8))  # padding, as writers align the header
    keep_len = draw(st.integers(0, 9)) == 0  # mostly a consistent length
    length = hlen if keep_len else len(text)
    return desc + (" (old length)" if keep_len else ""), struct.pack("<Q", length) + text + body


@st.composite
def gguf_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Edit GGUF header fields (version, tensor and key-value counts, the first key's length)
    or damage its bytes."""
    op = draw(st.sampled_from(["version", "n_tensors", "n_kv", "key_len", "magic", "bytes", "bytes"]))
    if op == "version":
        v = draw(st.sampled_from(INTERESTING_U32))
        return f"version {v}", data[:4] + struct.pack("<I", v) + data[8:]
    if op in ("n_tensors", "n_kv", "key_len"):
        off = {"n_tensors": 8, "n_kv": 16, "key_len": 24}[op]
        (old,) = struct.unpack("<Q", data[off:off + 8])
        v = draw(st.one_of(st.sampled_from(INTERESTING_U64), st.integers(max(old - 3, 0), old + 3)))
        return f"{op} {old} → {v}", data[:off] + struct.pack("<Q", v) + data[off + 8:]
    if op == "magic":
        m = draw(st.sampled_from([b"GGML", b"GGJT", b"FUGG", b"\0\0\0\0"]))
        return f"magic {m!r}", m + data[4:]
    return draw(byte_mutation(data))


@st.composite
def torch_zip_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Rewrite a torch.save zip with one member damaged (the pickle, a storage, the version or
    byteorder record) or dropped; or damage the zip's bytes."""
    op = draw(st.sampled_from(["member", "member", "drop", "pickle-opcodes", "bytes", "bytes"]))
    if op == "bytes":
        return draw(byte_mutation(data))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    names = sorted(members)
    name = draw(st.sampled_from(names))
    if op == "drop":
        del members[name]
        desc = f"drop {name}"
    elif op == "pickle-opcodes":
        name = next(n for n in names if n.endswith("data.pkl"))
        members[name] = draw(st.sampled_from([
            b"\x80\x02}q\x00.",  # an empty dict
            b"\x80\x02]q\x00.",  # a list
            b"\x80\x02K\x05.",  # an int
            b"\x80\x02X\x03\x00\x00\x00abcq\x00.",  # a string
            b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.",  # {"a": 1}
            b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",  # a global: refused
            b"\x80\x02(" * 5000 + b".",  # deep marks
            b"\x80\x02" + b"]" * 100000 + b".",  # many lists
            b"",
        ]))
        desc = f"{name} replaced by a small pickle"
    else:
        d, members[name] = draw(byte_mutation(members[name]))
        desc = f"{name}: {d}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    return desc, buf.getvalue()


@st.composite
def onnx_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Edit the ONNX model proto (versions, opset, an initializer's dims/type/data, a node's
    op/inputs, the graph's inputs) and serialize it; or damage the protobuf bytes."""
    import onnx

    op = draw(st.sampled_from(["ir_version", "opset", "init_dims", "init_type", "init_data", "op_type", "node_input",
                               "drop_input", "drop_node", "bytes", "bytes", "bytes"]))
    if op == "bytes":
        return draw(byte_mutation(data))
    model = onnx.load_from_string(data)
    g = model.graph
    if op == "ir_version":
        model.ir_version = draw(st.sampled_from([0, 1, 3, 7, 10, 11, 99, 2**40]))
    elif op == "opset":
        model.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 13, 25, 99, 2**40]))
    elif op == "init_dims":
        del g.initializer[0].dims[:]
        g.initializer[0].dims.extend(draw(st.lists(st.integers(-3, 2**40), max_size=3)))
    elif op == "init_type":
        g.initializer[0].data_type = draw(st.integers(0, 30))
    elif op == "init_data":
        t = g.initializer[0]
        del t.float_data[:]
        t.raw_data = draw(st.binary(max_size=24))
    elif op == "op_type":
        g.node[draw(st.integers(0, len(g.node) - 1))].op_type = draw(st.sampled_from(["Foo", "", "Relu", "Add", "Gemm"]))
    elif op == "node_input":
        n = g.node[draw(st.integers(0, len(g.node) - 1))]
        n.input[0] = draw(st.sampled_from(["", "missing", "logits", "W"]))
    elif op == "drop_input":
        del g.input[draw(st.integers(0, len(g.input) - 1))]
    else:
        del g.node[draw(st.integers(0, len(g.node) - 1))]
    return op, model.SerializeToString()


@st.composite
def onnx_adapter_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Edit the .onnx_adapter flatbuffer's root offset or file identifier, or damage its
    bytes."""
    op = draw(st.sampled_from(["root", "ident", "bytes", "bytes", "bytes"]))
    if op == "root":
        v = draw(st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, len(data) + 8)))
        return f"root offset {v}", struct.pack("<I", v) + data[4:]
    if op == "ident":
        return "file identifier", data[:4] + draw(st.binary(min_size=4, max_size=4)) + data[8:]
    return draw(byte_mutation(data))


class Mutated(tuple):
    """(description, bytes) with a short repr for hypothesis' reports."""

    def __repr__(self):
        desc, data = self
        return f"<{desc}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"


def mutation_for(file: str):
    """The hypothesis strategy of damage for a file, chosen by its name."""
    if file.endswith(".json"):
        return json_mutation
    if file.endswith(".safetensors"):
        return safetensors_mutation
    if file.endswith(".gguf"):
        return gguf_mutation
    if file.endswith(".onnx"):
        return onnx_mutation
    if file.endswith(".onnx_adapter"):
        return onnx_adapter_mutation
    return None  # .bin: chosen by content in the test


# --- one case --------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised in the main thread when a case runs over CASE_SECONDS (a BaseException, so no
    ``except Exception`` in the library swallows it)."""


@dataclass
class Result:
    code: int | None
    out: str
    err_lines: list[str]
    seconds: float
    exception: str | None = None


class _Lines(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record):
        self.sink.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _fd_capture(fd: int):
    """Capture what native code writes to ``fd`` (1 or 2) into a temporary file."""
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), fd)
        box = [b""]
        try:
            yield box
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            f.seek(0)
            box[0] = f.read()


def run_cli(argv: list[str], cwd: Path, limit: float | None = CASE_SECONDS) -> Result:
    """``loradeploy.cli.main(argv)`` in this process from ``cwd``: Python and native stdout and
    stderr, warning log records and Python warnings captured (each would be a stderr line in
    a real run), stopped after ``limit`` seconds."""
    out, err = io.StringIO(), io.StringIO()
    logged: list[str] = []
    handler = _Lines(logged)
    root = logging.getLogger()
    old_cwd = os.getcwd()

    def _alarm(signum, frame):
        raise CaseTimeout(f"over {limit:g} s")

    # pytest-timeout's per-test alarm (timeout method: signal) is paused here and re-armed after
    pending, _ = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, _alarm)
    code, exc = None, None
    start = time.perf_counter()
    root.addHandler(handler)
    os.chdir(cwd)
    try:
        with _fd_capture(1) as native_out, _fd_capture(2) as native_err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # Python's default filters, as a real run has them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            if limit:
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                code = main(argv)
            except BaseException as e:  # noqa: BLE001 - a bug, reported by the test
                import traceback

                exc = "".join(traceback.format_exception(e))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.perf_counter() - start), 1e-3))
        os.chdir(old_cwd)
        root.removeHandler(handler)
    seconds = time.perf_counter() - start
    warned = [f"{w.category.__name__}: {w.message}" for w in caught]
    err_lines = (err.getvalue().splitlines() + native_err[0].decode(errors="replace").splitlines()
                 + logged + warned)
    # timestamped progress lines (stderr is not a terminal here) are not errors: see tests.support.cli.error_text
    return Result(code, out.getvalue() + native_out[0].decode(errors="replace"),
                  [ln for ln in error_text("\n".join(err_lines)).splitlines() if ln.strip()], seconds, exc)


def check_result(res: Result, kind: str, tier: str, allowed=(0, 2), describe: str = "") -> str:
    """The properties every case must have; records the outcome; returns it."""
    outcome = ("exception" if res.exception else "timeout" if res.seconds >= CASE_SECONDS
               else f"exit {res.code}")
    COUNTS[tier][kind][outcome] += 1
    CASE_TIMES[tier][kind] += res.seconds
    where = f"[{kind}] {describe}"
    assert res.exception is None, f"{where}: exception escaped main():\n{res.exception}"
    assert res.seconds < CASE_SECONDS, f"{where}: took {res.seconds:.1f} s"
    assert res.code in allowed, f"{where}: exit {res.code}, expected one of {allowed}\n{res.err_lines}"
    text = "\n".join(res.err_lines) + res.out
    assert "Traceback" not in text, f"{where}: a traceback was printed:\n{text[:2000]}"
    if res.code == 2:
        try:
            assert_bad_input(res.code, "\n".join(res.err_lines), out=res.out)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
    else:
        assert res.err_lines == [], f"{where}: exit {res.code} but stderr has {res.err_lines}"
    return outcome


def table(tier: str) -> str:
    kinds = COUNTS.get(tier, {})
    outcomes = sorted({o for v in kinds.values() for o in v})
    width = max([len(k) for k in kinds] + [9])
    lines = [f"{'file kind':<{width}}  " + "  ".join(f"{o:>9}" for o in outcomes) + "      all"]
    for k, v in sorted(kinds.items()):
        lines.append(f"{k:<{width}}  " + "  ".join(f"{v.get(o, 0):>9}" for o in outcomes) + f"  {sum(v.values()):>7}")
    total = {o: sum(v.get(o, 0) for v in kinds.values()) for o in outcomes}
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[o]:>9}" for o in outcomes)
                 + f"  {sum(total.values()):>7}")
    return "\n".join(lines)
