"""onnx-web plugin, runtime side: the one loader of web bundles. The bundle's own
``loradeploy.mjs`` runs in Node (onnxruntime-web's WebAssembly backend, the wasm binary a
browser runs) in one persistent worker process; this session drives it over a pipe, so
validation, ``verify``, the latency worker and ``ab`` all run the bundle as a page would. Calls
are serialized (onnxruntime-web runs one call of a session at a time). The writer is
``loradeploy.plugins.onnx_web.exporter``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ...errors import BaseModelError
from ...runtime.session import Session, refuse
from . import SPEC, WEB_CONFIG, read_file_metadata
from .lm_session import LmCalls
from .node import NodeWorker


def _check_wasm(path: Path) -> str | None:
    with open(path, "rb") as f:
        return None if f.read(4) == b"\0asm" else "not a WebAssembly module (no \\0asm magic)"


def _adapter_problems(path: Path, config: dict) -> list[str]:
    """What in the adapter file at ``path`` does not fit the bundle's graph inputs (``web.json``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = read_file_metadata(f.metadata())
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  the library's complaint is the file's problem
        raise BaseModelError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if meta.get("base_fingerprint") != config["base_fingerprint"]:
        return [f"it names base {meta.get('base_fingerprint')}, the bundle's is {config['base_fingerprint']}"]
    problems = []
    for name, shape in sorted(shapes.items()):
        slot, fixed = config["slots"].get(name), config["travelling"].get(name)
        if slot is not None:
            axis = 0 if slot["role"] == "lora_A" else 1
            if len(shape) != 2 or shape[axis] != slot["shape"][axis]:
                problems.append(f"{name} is {shape}, the graph takes {slot['shape']}")
        elif fixed is not None:
            if shape != fixed:
                problems.append(f"{name} is {shape}, the graph takes {fixed}")
        else:
            problems.append(f"{name} is not an input of this graph")
    return problems


class NodeWebSession(LmCalls, Session):
    runtime = SPEC.name
    FILE_CHECKS = {".wasm": _check_wasm}

    def __init__(self, artifact: Path, manifest, threads: int = 0, workers: int = 0):
        super().__init__(artifact, manifest)
        self.config = json.loads((self.artifact / WEB_CONFIG).read_text())
        self.threads = threads or 1
        self.worker = NodeWorker()
        try:
            self.web_info = self.worker.call("open", bundle=str(self.artifact.absolute()), threads=self.threads)
        except BaseException:
            self.worker.close()
            raise

    def encode(self, texts):
        """``input_ids``/``attention_mask`` by the bundle's JS tokenizer (what a page runs)."""
        enc = self.worker.call("encode", texts=list(texts))
        return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}

    def _check_tensors(self, path):
        refuse(path, "graph inputs", _adapter_problems(path, self.config))

    def _load(self, name, path):
        self.worker.call("load", name=name, path=str(Path(path).absolute()))
        return name

    def _free(self, rec):
        if self.worker is not None:
            self.worker.call("unload", name=rec.handle)

    def _run(self, inputs, rec):
        if self.is_lm:
            return self.run_lm(inputs, rec)
        out = self.worker.call("run_ids", input_ids=np.asarray(inputs["input_ids"]).tolist(),
                               attention_mask=np.asarray(inputs["attention_mask"]).tolist(),
                               adapter=rec.handle if rec is not None else None)
        return np.asarray(out, dtype=np.float32)

    def run_texts(self, texts: list[str], adapter: str | None = None) -> np.ndarray:
        """Outputs of ``loradeploy.mjs``'s ``run(texts, {adapter})`` (its tokenizer, its batching)."""
        with self.holding(adapter) as rec:
            out = self.worker.call("run_texts", texts=list(texts), adapter=rec.handle if rec is not None else None)
        return np.asarray(out, dtype=np.float32)

    def measure(self, adapter, shapes, warmup, runs, reference) -> dict:
        """Latency through this session (the pipe costs about 2 ms per call here), and the Node
        process's peak RSS: the latency worker's own peak is the Python side's only. LM bundles:
        the decoder protocol (:meth:`~.lm_session.LmCalls.measure_lm`)."""
        if self.is_lm:
            return self.measure_lm(adapter, shapes, warmup, runs, reference)
        result = super().measure(adapter, shapes, warmup, runs, reference)
        return {**result, "node_peak_rss_mb": float(self.worker.call("peak_rss_mb"))}

    def runtime_version(self) -> str | None:
        """The onnxruntime-web version the bundle's own JS reports (an npm package: no Python
        distribution holds it), so a bundle on another onnxruntime-web is another fingerprint."""
        return self.web_info.get("ortVersion")

    def runtime_checks(self, texts, progress=None) -> tuple[dict, list]:
        """The bundle's JS tokenizer against the Hugging Face tokenizer the reference used, on
        every eval text (a page that tokenizes otherwise answers otherwise); then the browser
        check (:mod:`.browser`): the same inputs in headless Chromium."""
        from .browser import browser_check

        same = self.lm_tokenizer_matches(texts) if self.is_lm else self._tokenizer_matches(texts)
        agreement = same / len(texts) if texts else 1.0
        if progress:
            progress(f"tokenizer: loradeploy.mjs gives the reference's token ids on {same} of {len(texts)} eval texts")
        metrics, rows = browser_check(self, progress)
        metrics["tokenizer"] = {"agreement": agreement, "texts": len(texts), "library": "@huggingface/tokenizers"}
        return metrics, [("tokenizer_agreement", agreement, 1.0, ">="), *rows]

    def _tokenizer_matches(self, texts) -> int:
        """On how many eval texts the JS tokenizer's padded, truncated ids equal the reference's."""
        import transformers

        hf = transformers.AutoTokenizer.from_pretrained(str(self.artifact))
        max_length = self.config["max_length"]
        same = 0
        for start in range(0, len(texts), 64):
            chunk = list(texts[start:start + 64])
            ours = self.worker.call("encode", texts=chunk)["input_ids"]
            theirs = hf(chunk, padding=True, truncation=True, max_length=max_length)["input_ids"]
            same += sum(a == b for a, b in zip(ours, theirs))
        return same

    def close(self):
        super().close()
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    @staticmethod
    def reference_unit(threads: int = 0):
        """A fixed MLP block (384 → 1536 → 384 on 128 positions, seeded weights) in
        onnxruntime-web's wasm backend in its own Node worker: ms per call, timed in Node."""
        from onnx import TensorProto, helper, numpy_helper

        from .node import ORT_DIST

        rng = np.random.default_rng(0)
        hidden, ffn, seq = 384, 1536, 128
        weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)
                   for name, shape in (("w1", (hidden, ffn)), ("w2", (ffn, hidden)))]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("MatMul", ["r", "w2"], ["y"])]
        graph = helper.make_graph(nodes, "reference_unit",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        worker = NodeWorker()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference_unit.onnx"
            path.write_bytes(model.SerializeToString())
            worker.call("reference_open", ort_module=str(ORT_DIST / "ort.wasm.min.mjs"), model=str(path),
                        threads=threads or 1)

        def unit() -> float:
            return float(worker.call("reference_unit"))
        unit.worker = worker  # kept alive as long as the unit
        return unit
