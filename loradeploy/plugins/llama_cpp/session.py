"""llama.cpp plugin, runtime side: the one loader of llama.cpp artifacts (through
llama-cpp-python). One ``llama_model``, adapters loaded once on it and activated per context. A
context is not shareable across threads, so the session keeps a pool of ``workers`` contexts; a
call borrows one. Adapters on a context only change while the pool's lock is held, and a freed
adapter is first cleared from the idle contexts (busy ones hold the adapter of their own call).
The artifact's writer is ``loradeploy.plugins.llama_cpp.exporter``."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ...errors import BaseModelError, LoradeployError
from .header import read_header
from ...manifest import BaseRecord, Manifest, TargetRecord
from . import SPEC
from .model_lock import ModelLock
from ...runtime.session import Generation, Loaded, Session, refuse

MODEL_FILE = "model.gguf"
log = logging.getLogger("llama.cpp")
_LOG_CALLBACK = None  # kept alive for as long as llama.cpp may call it


def route_llama_log(llama_cpp) -> None:
    """Route llama.cpp's log (a warning per quantized adapter tensor it places) to the
    ``llama.cpp`` logger at DEBUG: llama-cpp-python's own filter maps ggml's current level
    numbers wrongly and prints them."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(
            lambda level, text, _: log.debug(text.decode("utf-8", "replace").rstrip()))
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _check_gguf(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        return "not a GGUF file (bad magic)"
    if path.stat().st_size < 64 * 2**20:  # adapter files: every tensor's header, and its data in the file
        problem = read_header(path).extent_problem()
        return f"not a valid gguf file ({problem})" if problem else None
    return None


def gguf_tensor_shapes(path: Path) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """``general.architecture`` and every tensor's dims (ggml order) from a GGUF header."""
    header = read_header(path)
    return header.architecture, {name: t.dims for name, t in header.tensors.items()}


class _Worker:
    """One llama.cpp context (with its batch) and the adapter set on it."""

    def __init__(self, ll, internals, model, params, n_batch: int):
        self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self.batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_batch, self._ll, self.active = n_batch, ll, None
        self.shared = None  # the model lock, held shared while a caller uses this context

    def set_adapter(self, rec: Loaded | None) -> None:
        if rec is None:
            code = self._ll.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            code = self._ll.llama_set_adapters_lora(self.ctx.ctx, (self._ll.llama_adapter_lora_p_ctypes * 1)(rec.handle),
                                                    1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise LoradeployError(f"llama.cpp could not set adapter {rec.info.name if rec else None!r} (code {code})")
        self.active = rec

    def decode(self, tokens: list[int], n_past: int = 0) -> None:
        for i in range(0, len(tokens), self.n_batch):
            self.batch.set_batch(tokens[i:i + self.n_batch], n_past=n_past + i, logits_all=False)
            self.ctx.decode(self.batch)

    def last_logits(self, tokens: list[int], n_vocab: int) -> np.ndarray:
        self.ctx.kv_cache_clear()
        self.decode(tokens)
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()

    def all_logits(self, tokens: list[int], n_vocab: int) -> np.ndarray:
        """Logits of every position ``[len(tokens), n_vocab]``."""
        self.ctx.kv_cache_clear()
        out = np.empty((len(tokens), n_vocab), np.float32)
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            self.batch.set_batch(chunk, n_past=i, logits_all=True)
            self.ctx.decode(self.batch)
            out[i:i + len(chunk)] = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(chunk), n_vocab))
        return out


class LlamaSession(Session):
    runtime = SPEC.name
    FILE_CHECKS = {".gguf": _check_gguf}

    def __init__(self, artifact: Path, manifest: Manifest, threads: int = 0, workers: int = 2, n_ctx: int = 256,
                 model: Path | None = None):
        import llama_cpp
        from llama_cpp import _internals

        super().__init__(artifact, manifest)
        route_llama_log(llama_cpp)
        llama_cpp.llama_backend_init()
        self._ll, self._path = llama_cpp, Path(model) if model else self.artifact / MODEL_FILE
        self.threads = threads
        self.model = _internals.LlamaModel(path_model=str(self._path), params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        self.n_vocab, self.n_ctx = self.model.n_vocab(), n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._params = params
        self._pool = [_Worker(llama_cpp, _internals, self.model, params, n_ctx) for _ in range(max(workers, 1))]
        self._idle, self._cv = list(self._pool), threading.Condition()
        self._model_lock = ModelLock()  # decode (shared) vs adapter init/free (exclusive)
        self._base_tensors: dict[str, tuple[int, ...]] | None = None

    def encode(self, texts):
        rows = [self.model.tokenize(t.encode("utf-8"), add_bos=True, special=False)[: self.n_ctx] for t in texts]
        ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def _gguf_info(self):
        if self._base_tensors is None:
            self._arch, self._base_tensors = gguf_tensor_shapes(self._path)
        return self._arch, self._base_tensors

    def _check_tensors(self, path):
        import gguf

        arch, base = self._gguf_info()
        try:
            reader = gguf.GGUFReader(str(path))  # small: read every field
        except (ValueError, OSError) as e:
            raise BaseModelError(f"{path}: not a GGUF file ({e})") from e
        field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
        if field("general.type") != "adapter" or field("adapter.type") != "lora":
            raise BaseModelError(f"{path}: not a LoRA adapter GGUF (general.type {field('general.type')!r})")
        theirs = field("general.architecture")
        problems = [] if theirs == arch else [f"architecture {theirs}, the base is {arch}"]
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order: [in, out]
        for name, a in sorted(shapes.items()):
            if not name.endswith(".lora_a"):
                continue
            target, b = name.removesuffix(".lora_a"), shapes.get(name.removesuffix("_a") + "_b")
            w = base.get(target)
            if w is None or b is None:
                problems.append(f"{target} is not a tensor of the base" if w is None else f"{name} has no lora_b")
            elif len(w) != 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
                problems.append(f"{target}: lora_a {list(a)} / lora_b {list(b)} do not fit the base's {list(w)}")
        refuse(path, "GGUF base", problems)

    def _load(self, name, path):
        with self._model_lock.exclusive():
            ptr = self._ll.llama_adapter_lora_init(self.model.model, str(path).encode())
        if not ptr:
            raise BaseModelError(f"{path}: llama.cpp refused the adapter")
        return ptr

    def _free(self, rec):
        with self._model_lock.exclusive():
            with self._cv:  # clear it from idle contexts; busy ones hold another adapter (see module doc)
                for w in self._idle:
                    if w.active is rec:
                        w.set_adapter(None)
            self._ll.llama_adapter_lora_free(rec.handle)

    def _acquire(self, rec: Loaded | None) -> _Worker:
        """An idle context with ``rec`` set, holding the model lock shared until :meth:`_release`."""
        shared = self._model_lock.shared()
        shared.__enter__()
        try:
            worker = self._take(rec)
        except BaseException:
            shared.__exit__(None, None, None)
            raise
        worker.shared = shared
        return worker

    def _take(self, rec: Loaded | None) -> _Worker:
        with self._cv:
            while not self._idle:
                self._cv.wait()
            worker = next((w for w in self._idle if w.active is rec), self._idle[0])
            self._idle.remove(worker)
            try:
                if worker.active is not rec:
                    worker.set_adapter(rec)
            except LoradeployError:
                self._idle.append(worker)
                raise
        return worker

    def _release(self, worker: _Worker) -> None:
        shared, worker.shared = worker.shared, None
        with self._cv:
            self._idle.append(worker)
            self._cv.notify()
        shared.__exit__(None, None, None)

    def _rec(self, adapter: str | None) -> Loaded | None:
        with self._lock:
            if adapter is not None and adapter not in self._adapters:
                raise LoradeployError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._adapters) or 'none'})")
            return self._adapters.get(adapter) if adapter else None

    def _run(self, inputs, rec):
        rows = [[int(t) for t, m in zip(r, k) if m] for r, k in zip(inputs["input_ids"], inputs["attention_mask"])]
        if any(not 0 < len(r) <= self.n_ctx for r in rows):
            raise LoradeployError(f"every input needs 1 to {self.n_ctx} tokens (this session's context size)")
        worker = self._acquire(rec)
        try:
            return np.stack([worker.last_logits(r, self.n_vocab) for r in rows])
        finally:
            self._release(worker)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        if not 0 < len(tokens) <= self.n_ctx:
            raise LoradeployError(f"an input needs 1 to {self.n_ctx} tokens (this session's context size)")
        worker = self._acquire(self._rec(adapter))
        try:
            return worker.all_logits(tokens, self.n_vocab)
        finally:
            self._release(worker)

    def greedy(self, tokens, adapter=None, n=32):
        return self._greedy(list(tokens), adapter, n, stop_at_eos=False)

    def generate(self, prompt, adapter=None, max_new_tokens=32):
        tokens = self.tokenize(prompt)
        with self.holding(adapter) as rec:
            out = self._greedy(tokens, adapter, max_new_tokens, stop_at_eos=True)
            fingerprint = rec.info.fingerprint if rec else None
        text = b"".join(self.model.token_to_piece(t) for t in out).decode("utf-8", errors="replace")
        return Generation(out, text, adapter, fingerprint, len(tokens))

    def _greedy(self, tokens: list[int], adapter, n: int, stop_at_eos: bool) -> list[int]:
        if not tokens or len(tokens) + n > self.n_ctx:
            raise LoradeployError(f"prompt and generated tokens must fit this session's context ({self.n_ctx})")
        with self.holding(adapter) as rec:
            worker = self._acquire(rec)
            try:
                logits = worker.last_logits(tokens, self.n_vocab)
                out: list[int] = []
                while len(out) < n:
                    out.append(int(np.argmax(logits)))
                    if (stop_at_eos and self._ll.llama_vocab_is_eog(self.model.vocab, out[-1])) or len(out) == n:
                        break
                    worker.decode(out[-1:], n_past=len(tokens) + len(out) - 1)
                    logits = np.ctypeslib.as_array(worker.ctx.get_logits_ith(-1), shape=(self.n_vocab,))
                return out
            finally:
                self._release(worker)

    def close(self):
        super().close()
        for w in self._pool:
            w.batch.close()
            w.ctx.close()
        self.model.close()

    @classmethod
    def open_base(cls, base: Path, threads: int = 0) -> "LlamaSession":
        """The base GGUF alone (no artifact): how much of the artifact's gap is the base's own."""
        manifest = Manifest(TargetRecord("base", SPEC.name, {}), "merged", "causal-lm", None,
                            BaseRecord(str(base), str(base), []), {}, [], {}, [])
        return cls(Path(base).parent, manifest, threads=threads, workers=1, model=Path(base))

    # -- latency, measured by the latency worker in a fresh process ---------------------------
    def measure(self, adapter, shapes, warmup, runs, reference) -> dict:
        from .measure import measure_llama

        return measure_llama(self, adapter, shapes, warmup, runs, reference)

    @staticmethod
    def reference_unit(threads: int = 0):
        """Prompt processing of 64 tokens on :func:`reference_model` in llama.cpp, at the runner's
        thread count: the same ggml kernels (Q8_0 dot products) the artifact's model runs."""
        import time

        import llama_cpp

        route_llama_log(llama_cpp)
        from .reference import REFERENCE_MODEL, reference_model

        llm = llama_cpp.Llama(model_path=str(reference_model()), n_ctx=4 * REFERENCE_MODEL["tokens"],
                              n_batch=REFERENCE_MODEL["tokens"], verbose=False, n_threads=threads or os.cpu_count())
        tokens = [1] + [300 + i for i in range(REFERENCE_MODEL["tokens"] - 1)]

        def unit() -> float:
            t0 = time.perf_counter()
            llm.reset()
            llm.eval(tokens)
            return (time.perf_counter() - t0) * 1e3
        unit.model = llm  # kept alive with the unit
        return unit


