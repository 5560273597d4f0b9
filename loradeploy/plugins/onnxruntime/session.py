"""ONNX Runtime plugin, runtime side: the one loader of onnxruntime artifacts. One
``InferenceSession`` (``run`` is thread-safe); each call builds its own ``RunOptions`` with its
adapter (a ``LoraAdapter``) active, so calls share no adapter state. The artifact's writer is
``loradeploy.plugins.onnxruntime.exporter``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...errors import BaseModelError, LoradeployError
from . import MODEL_FILE, SPEC
from .decoder import Decoder, measure_decoder
from .ort import inference_session, session_options
from ...runtime.session import Generation, HfTokenizer, Session, refuse



def _check_onnx(path: Path) -> None:
    """The ONNX checker; a graph with onnxruntime's own operators (the LM decoder's
    GroupQueryAttention, SimplifiedLayerNormalization …), which the checker does not know, must
    load in onnxruntime instead (graph optimizations off: the check is the file, not the speed)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        if "No Op registered" not in str(e) and "No opset import for domain 'com.microsoft'" not in str(e):
            raise
        import onnxruntime as ort

        so = session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_adapter(path: Path) -> None:
    import onnxruntime as ort

    ort.LoraAdapter().Load(str(path))


class OrtSession(HfTokenizer, Session):
    runtime = SPEC.name
    FILE_CHECKS = {".onnx": _check_onnx, ".onnx_adapter": _check_adapter}

    def __init__(self, artifact: Path, manifest, threads: int = 0, workers: int = 0):
        import onnxruntime as ort

        super().__init__(artifact, manifest)
        self._ort = ort
        provider = manifest.target.profile.get("execution_provider", "CPUExecutionProvider")
        self.session = inference_session(self.artifact / MODEL_FILE, threads, provider)
        self._slots = {i.name: i for i in self.session.get_overridable_initializers()}
        self._decoder = Decoder(self.session, self.artifact) if manifest.task == "causal-lm" else None

    @classmethod
    def timing_signature(cls, adapter_file):
        import onnxruntime as ort

        params = ort.AdapterFormat.read_adapter(str(adapter_file)).get_parameters()
        return {name: [str(v.data_type()), [int(d) for d in v.shape()]] for name, v in sorted(params.items())}

    def _check_tensors(self, path):
        try:
            params = self._ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as e:  # onnxruntime raises its own RuntimeError types
            raise BaseModelError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0]})") from e
        problems = []
        for name, value in sorted(params.items()):
            slot = self._slots.get(name)
            if slot is None:
                problems.append(f"{name} is not an input of this graph")
            elif value.data_type() != slot.type or len(value.shape()) != len(slot.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(slot.shape, value.shape())):
                problems.append(f"{name} is {value.data_type()} {value.shape()}, the graph takes {slot.type} {slot.shape}")
        refuse(path, "graph inputs", problems)

    def _load(self, name, path):
        lora = self._ort.LoraAdapter()
        lora.Load(str(path))
        return lora

    def _free(self, rec):
        rec.handle = None  # calls hold their own RunOptions referencing it

    def run_options(self, rec):
        """``RunOptions`` with ``rec``'s adapter active (None: the base alone)."""
        options = self._ort.RunOptions()
        if rec is not None:
            options.add_active_adapter(rec.handle)
        return options

    def _run(self, inputs, rec):
        options = self.run_options(rec)
        if self._decoder is not None:  # last-position logits of each row's tokens
            return np.stack([self._decoder.forward([int(t) for t, m in zip(ids, mask) if m], None, options)[0][-1]
                             for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])])
        feeds = {k: np.asarray(inputs[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        return self.session.run(None, feeds, options)[0]

    # -- causal LMs: the KV-cache decoder -----------------------------------------------------
    def decoder(self) -> Decoder:
        """The KV-cache decoder of a causal-LM artifact (an error for an encoder's)."""
        if self._decoder is None:
            raise LoradeployError(f"{self.artifact}: a {self.task} artifact, not a language model")
        return self._decoder

    def logits(self, tokens, adapter=None):
        with self.holding(adapter) as rec:
            return self.decoder().forward(list(tokens), None, self.run_options(rec))[0]

    def greedy(self, tokens, adapter=None, n=32):
        with self.holding(adapter) as rec:
            return self.decoder().greedy(list(tokens), n, self.run_options(rec), stop_at_eos=False)

    def generate(self, prompt, adapter=None, max_new_tokens=32):
        tokens = self.tokenize(prompt)
        with self.holding(adapter) as rec:
            out = self.decoder().greedy(tokens, max_new_tokens, self.run_options(rec))
            fingerprint = rec.info.fingerprint if rec else None
        with self._tokenizer_lock:
            text = self._hf_tokenizer().decode(out, skip_special_tokens=True)
        return Generation(out, text, adapter, fingerprint, len(tokens))

    def measure(self, adapter, shapes, warmup, runs, reference) -> dict:
        if self._decoder is None:
            return super().measure(adapter, shapes, warmup, runs, reference)
        with self.holding(adapter) as rec:
            return measure_decoder(self, rec, shapes, warmup, runs, reference)

    def close(self):
        super().close()
        self.session = None

    @staticmethod
    def reference_unit(threads: int = 0):
        """A fixed MLP block (384 → 1536 → 384 on 128 positions, seeded weights) in an
        InferenceSession with the artifact's session options: the same MLAS kernels the artifact
        runs, so a ratio to it carries over between runs of one CPU kind and thread count."""
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

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
        session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                       providers=["CPUExecutionProvider"])
        feed = {"x": rng.standard_normal((1, seq, hidden)).astype(np.float32)}

        def unit() -> float:
            t0 = time.perf_counter()
            session.run(None, feed)
            return (time.perf_counter() - t0) * 1e3
        return unit
