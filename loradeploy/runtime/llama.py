"""llama.cpp session: one ``llama_model``, adapters loaded once on it and activated per context.
A context is not shareable across threads, so the session keeps a pool of ``workers`` contexts;
a call borrows one. Adapters on a context only change while the pool's lock is held, and a freed
adapter is first cleared from the idle contexts (busy ones hold the adapter of their own call)."""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from pathlib import Path

import numpy as np

from ..errors import BaseModelError, LoradeployError
from .session import Loaded, Session, refuse

log = logging.getLogger("llama.cpp")


def _quiet(llama_cpp) -> None:
    from ..targets.gguf import route_llama_log

    route_llama_log(llama_cpp)


#: GGUF metadata value type → struct format of one value (8: string, 9: array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensor_shapes(path: Path) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """``general.architecture`` and every tensor's dims (ggml order) from a GGUF header,
    skipping the other metadata values without decoding them."""
    with Path(path).open("rb") as f:
        data = f.read(1 << 16)
        buf = bytearray(data)
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos, buf
            while pos + n > len(buf):
                more = f.read(max(n, 1 << 20))
                if not more:
                    raise BaseModelError(f"{path}: truncated GGUF header")
                buf += more
            pos += n
            return bytes(buf[pos - n:pos])

        def unpack(fmt: str):
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            return take(unpack("Q")).decode("utf-8", "replace")

        def skip(vtype: int) -> None:
            if vtype == 8:
                string()
            elif vtype == 9:
                etype, n = unpack("I"), unpack("Q")
                if etype in _GGUF_SCALARS:
                    take(n * struct.calcsize(_GGUF_SCALARS[etype]))
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                take(struct.calcsize(_GGUF_SCALARS[vtype]))

        if take(4) != b"GGUF":
            raise BaseModelError(f"{path}: not a GGUF file")
        _version, n_tensors, n_kv = unpack("I"), unpack("Q"), unpack("Q")
        arch = None
        for _ in range(n_kv):
            key, vtype = string(), unpack("I")
            if key == "general.architecture" and vtype == 8:
                arch = string()
            else:
                skip(vtype)
        shapes = {}
        for _ in range(n_tensors):
            name, n_dims = string(), unpack("I")
            shapes[name] = tuple(unpack("Q") for _ in range(n_dims))
            take(12)  # type (u32) and offset (u64)
    return arch, shapes


class _Worker:
    """One llama.cpp context (with its batch) and the adapter set on it."""

    def __init__(self, ll, internals, model, params, n_batch: int):
        self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self.batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_batch, self._ll, self.active = n_batch, ll, None

    def set_adapter(self, rec: Loaded | None) -> None:
        if rec is None:
            code = self._ll.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            code = self._ll.llama_set_adapters_lora(self.ctx.ctx, (self._ll.llama_adapter_lora_p_ctypes * 1)(rec.handle),
                                                    1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise LoradeployError(f"llama.cpp could not set adapter {rec.info.name if rec else None!r} (code {code})")
        self.active = rec

    def last_logits(self, tokens: list[int], n_vocab: int) -> np.ndarray:
        self.ctx.kv_cache_clear()
        for i in range(0, len(tokens), self.n_batch):
            self.batch.set_batch(tokens[i:i + self.n_batch], n_past=i, logits_all=False)
            self.ctx.decode(self.batch)
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()


class LlamaSession(Session):
    runtime = "llama.cpp"

    def __init__(self, artifact: Path, manifest: dict, threads: int = 0, workers: int = 2, n_ctx: int = 256):
        import llama_cpp
        from llama_cpp import _internals

        from ..targets.gguf import MODEL_FILE

        super().__init__(artifact, manifest)
        _quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        self._ll, self._path = llama_cpp, self.artifact / MODEL_FILE
        self.model = _internals.LlamaModel(path_model=str(self._path), params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        self.n_vocab, self.n_ctx = self.model.n_vocab(), n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the validated runner
        self._pool = [_Worker(llama_cpp, _internals, self.model, params, n_ctx) for _ in range(max(workers, 1))]
        self._idle, self._cv = list(self._pool), threading.Condition()
        self._model_lock = threading.Lock()  # adapter init/free touch the model's adapter list
        self._base_tensors: dict[str, tuple[int, ...]] | None = None

    def encode(self, texts):
        rows = [self.model.tokenize(t.encode("utf-8"), add_bos=True, special=False)[: self.n_ctx] for t in texts]
        ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def _gguf_info(self):
        if self._base_tensors is None:  # gguf.GGUFReader takes ~8 s on the Gemma base (its vocab)
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
        with self._model_lock:
            ptr = self._ll.llama_adapter_lora_init(self.model.model, str(path).encode())
        if not ptr:
            raise BaseModelError(f"{path}: llama.cpp refused the adapter")
        return ptr

    def _free(self, rec):
        with self._cv:  # clear it from idle contexts; busy ones hold another adapter (see module doc)
            for w in self._idle:
                if w.active is rec:
                    w.set_adapter(None)
        with self._model_lock:
            self._ll.llama_adapter_lora_free(rec.handle)

    def _acquire(self, rec: Loaded | None) -> _Worker:
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

    def _run(self, inputs, rec):
        rows = [[int(t) for t, m in zip(r, k) if m] for r, k in zip(inputs["input_ids"], inputs["attention_mask"])]
        if any(not 0 < len(r) <= self.n_ctx for r in rows):
            raise LoradeployError(f"every input needs 1 to {self.n_ctx} tokens (this session's context size)")
        worker = self._acquire(rec)
        try:
            return np.stack([worker.last_logits(r, self.n_vocab) for r in rows])
        finally:
            with self._cv:
                self._idle.append(worker)
                self._cv.notify()

    def close(self):
        super().close()
        for w in self._pool:
            w.batch.close()
            w.ctx.close()
        self.model.close()


