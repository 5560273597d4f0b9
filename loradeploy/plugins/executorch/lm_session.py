"""ExecuTorch sessions of causal-LM artifacts (:mod:`.lm_exporter`); every other artifact is served
exactly as :class:`~.session.ExecuTorchSession` serves it. The program's ``forward`` takes tokens at
their cache positions and keeps the KV cache in its own buffers, so one generation (a prompt, then
one token per call) holds the method for its whole length; the adapter is its padded factors, fed
with every call as for encoders (no reload)."""

from __future__ import annotations

import numpy as np

from ...errors import LoradeployError
from ...runtime.session import Generation
from .session import ExecuTorchSession


class KvCacheProgram:
    """The loaded KV-cache method: :meth:`forward` runs tokens at a start position (0 restarts the
    cache), :meth:`greedy` decodes through the cache. Not thread-safe: callers hold the lock."""

    def __init__(self, method, config: dict):
        self.method = method
        self.max_cache = int(config["max_seq"])
        self.vocab = int(config["vocab_size"])
        self.eos = set(config.get("eos_token_ids") or [])

    def forward(self, tokens: list[int], start: int, tensors: list) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` of ``tokens`` at positions ``start`` … (the cache keeps
        what came before ``start``)."""
        import torch

        if not tokens or start + len(tokens) > self.max_cache - 1:
            raise LoradeployError(f"{start + len(tokens)} tokens do not fit the program's KV cache "
                                  f"({self.max_cache - 1} positions)" if tokens else "no tokens to run")
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start, start + len(tokens), dtype=torch.long)
        return self.method.execute([ids, positions, *tensors])[0][0].detach().numpy().copy()

    def greedy(self, tokens: list[int], n: int, tensors: list, stop_at_eos: bool = True) -> list[int]:
        logits = self.forward(tokens, 0, tensors)
        out: list[int] = []
        while len(out) < n:
            out.append(int(np.argmax(logits[-1])))
            if (stop_at_eos and out[-1] in self.eos) or len(out) == n:
                break
            logits = self.forward(out[-1:], len(tokens) + len(out) - 1, tensors)
        return out


class ExecuTorchLmSession(ExecuTorchSession):
    """:class:`ExecuTorchSession`, plus causal LMs: per-position logits, greedy generation and the
    decoder latency protocol through the program's KV cache."""

    def __init__(self, artifact, manifest, threads: int = 0, workers: int = 0):
        super().__init__(artifact, manifest, threads, workers)
        self._kv = KvCacheProgram(self.method, self.config) if self.config.get("task") == "causal-lm" else None

    def kv_program(self) -> KvCacheProgram:
        if self._kv is None:
            raise LoradeployError(f"{self.artifact}: a {self.task} artifact, not a language model")
        return self._kv

    def _tensors(self, rec) -> list:
        return rec.handle if rec is not None else self._base_inputs

    def _run(self, inputs, rec):
        if self._kv is None:
            return super()._run(inputs, rec)
        rows = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        with self._call_lock:
            return np.stack([self._kv.forward(row, 0, self._tensors(rec))[-1] for row in rows])

    def logits(self, tokens, adapter=None):
        program = self.kv_program()
        with self.holding(adapter) as rec, self._call_lock:
            return program.forward(list(tokens), 0, self._tensors(rec))

    def greedy(self, tokens, adapter=None, n=32):
        program = self.kv_program()
        with self.holding(adapter) as rec, self._call_lock:
            return program.greedy(list(tokens), n, self._tensors(rec), stop_at_eos=False)

    def generate(self, prompt, adapter=None, max_new_tokens=32):
        program = self.kv_program()
        tokens = self.tokenize(prompt)
        with self.holding(adapter) as rec:
            with self._call_lock:
                out = program.greedy(tokens, max_new_tokens, self._tensors(rec))
            fingerprint = rec.info.fingerprint if rec else None
        with self._tokenizer_lock:
            text = self._hf_tokenizer().decode(out, skip_special_tokens=True)
        return Generation(out, text, adapter, fingerprint, len(tokens))

    def measure(self, adapter, shapes, warmup, runs, reference) -> dict:
        """The LM latency protocol (:func:`loradeploy.timing.time_decoder`): prompts of each
        profile length and tokens generated through the cache, with the adapter and the base."""
        if self._kv is None:
            return super().measure(adapter, shapes, warmup, runs, reference)
        from ...timing import time_decoder

        program = self.kv_program()

        def token(i: int) -> int:  # arbitrary ordinary tokens, within any vocabulary
            return 3 + (1000 + i) % (program.vocab - 3)

        with self.holding(adapter) as rec:
            tensors = {True: self._tensors(rec), False: self._base_inputs}

            def prompt(with_adapter: bool, seq: int):
                tokens = [2] + [token(i) for i in range(seq - 1)]
                return lambda: program.forward(tokens, 0, tensors[with_adapter])

            def generation(with_adapter: bool, n: int):
                start = [2, token(0), token(1), token(2)]

                def run():
                    program.forward(start, 0, tensors[with_adapter])
                    for i in range(n):
                        program.forward([token(i)], len(start) + i, tensors[with_adapter])
                return run

            with self._call_lock:
                return time_decoder(prompt, generation, [seq for _, seq in shapes], warmup, runs, reference)
