"""onnx-web plugin, runtime side of LM bundles: what :class:`~.session.NodeWebSession` does for a
``causal-lm`` bundle — the bundle's JS tokenizer, per-position logits, greedy tokens and generation,
all run by the bundle's own ``loradeploy.mjs`` (``lm.mjs``) in the Node worker; the decoder latency
protocol of :func:`loradeploy.timing.time_decoder` through it; and the tokenizer check."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ...runtime.session import Generation


class LmCalls:
    """Mixed into the web session before :class:`~loradeploy.runtime.session.Session` (uses
    ``self.worker``, ``self.holding``, ``self.config``); an encoder bundle gets the Session's own
    behaviour (``super()``)."""

    @property
    def is_lm(self) -> bool:
        return "decoder" in self.config

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt by the bundle's JS tokenizer (what the page feeds)."""
        if not self.is_lm:
            return super().tokenize(text)
        return [int(t) for t in self.worker.call("tokenize", text=text)]

    def logits(self, tokens, adapter=None) -> np.ndarray:
        """``[len(tokens), vocab]`` logits from an empty cache, computed in wasm."""
        if not self.is_lm:
            return super().logits(tokens, adapter)
        with self.holding(adapter) as rec:
            return self._logits(tokens, rec)

    def _logits(self, tokens, rec) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="loradeploy-logits-") as tmp:
            out = Path(tmp) / "logits.f32"
            dims = self.worker.call("logits", tokens=[int(t) for t in tokens], out=str(out),
                                    adapter=rec.handle if rec is not None else None)
            return np.fromfile(out, dtype="<f4").reshape(dims)

    def run_lm(self, inputs, rec) -> np.ndarray:
        """``Session.run`` of an LM bundle: the last position's logits of each row's tokens."""
        return np.stack([self._logits([int(t) for t, m in zip(ids, mask) if m], rec)[-1]
                         for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])])

    def greedy(self, tokens, adapter=None, n=32) -> list[int]:
        if not self.is_lm:
            return super().greedy(tokens, adapter, n)
        with self.holding(adapter) as rec:
            return self.worker.call("greedy", tokens=[int(t) for t in tokens], n=n,
                                    adapter=rec.handle if rec is not None else None)

    def generate(self, prompt, adapter=None, max_new_tokens=32) -> Generation:
        if not self.is_lm:
            return super().generate(prompt, adapter, max_new_tokens)
        with self.holding(adapter) as rec:
            out = self.worker.call("generate", prompt=prompt, max_new_tokens=max_new_tokens,
                                   adapter=rec.handle if rec is not None else None)
            fingerprint = rec.info.fingerprint if rec else None
        return Generation(out["tokens"], out["text"], adapter, fingerprint, out["promptTokens"])

    def measure_lm(self, adapter, shapes, warmup, runs, reference) -> dict:
        """Prompt and per-token times (the worker's calls, pipe included: about 2 ms a call) with the
        adapter and with the base alone, interleaved with the wasm reference unit."""
        from ...timing import time_decoder

        vocab = int(self.config["decoder"]["vocab_size"])

        def token(i: int) -> int:  # arbitrary ordinary tokens, within any vocabulary
            return 3 + (1000 + i) % (vocab - 3)

        with self.holding(adapter) as rec:
            names = {True: rec.handle if rec is not None else None, False: None}

            def prompt(with_adapter: bool, seq: int):
                tokens = [2] + [token(i) for i in range(seq - 1)]
                return lambda: self.worker.call("greedy", tokens=tokens, n=1, adapter=names[with_adapter])

            def generation(with_adapter: bool, n: int):
                start = [2, token(0), token(1), token(2)]
                return lambda: self.worker.call("greedy", tokens=start, n=n + 1, adapter=names[with_adapter])

            out = time_decoder(prompt, generation, [seq for _, seq in shapes], warmup, runs, reference)
        return {**out, "node_peak_rss_mb": float(self.worker.call("peak_rss_mb"))}

    def lm_tokenizer_matches(self, texts) -> int:
        """On how many eval texts the bundle's JS tokenizer gives the Hugging Face tokenizer's ids
        (validation and the reference tokenize with the session's: a page that tokenized otherwise
        would answer otherwise)."""
        import transformers

        hf = transformers.AutoTokenizer.from_pretrained(str(self.artifact))
        return sum(self.tokenize(t) == list(hf(t)["input_ids"]) for t in texts)
