"""The KV-cache decoder of a causal-LM ONNX artifact, and its latency (run by the latency worker
through ``OrtSession.measure``): prompt processing and generation speed with the adapter and with
the base alone, interleaved with the runtime's reference unit, and what switching adapters costs
next to reloading the session."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ...errors import BaseModelError
from . import GENAI_CONFIG, MODEL_FILE
from .ort import inference_session


class Decoder:
    """The KV-cache decoder of a causal-LM artifact, as its ``genai_config.json`` describes it:
    ``forward`` runs tokens after a cache (None: an empty one), greedy decoding reuses it."""

    def __init__(self, session, artifact: Path):
        try:
            config = json.loads((artifact / GENAI_CONFIG).read_text())["model"]
            dec = config["decoder"]
            names = dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"]
            out_names = dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]
            layers, kv, head = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BaseModelError(f"{artifact / GENAI_CONFIG}: missing or not a decoder description ({e})") from e
        self.session = session
        self.past = [n % i for i in range(layers) for n in names]
        self.outputs = [dec["outputs"]["logits"]] + [n % i for i in range(layers) for n in out_names]
        self.empty = np.zeros((1, kv, 0, head), np.float32)
        self.vocab = int(config["vocab_size"])
        eos = config.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def forward(self, tokens: list[int], past: list[np.ndarray] | None, options):
        """Logits ``[len(tokens), vocab]`` after ``past`` and the cache with the tokens added."""
        past = past or [self.empty] * len(self.past)
        total = past[0].shape[2] + len(tokens)
        feeds = {"input_ids": np.asarray([tokens], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        feeds.update(zip(self.past, past))
        out = self.session.run(self.outputs, feeds, options)
        return out[0][0], out[1:]

    def greedy(self, tokens: list[int], n: int, options, stop_at_eos: bool = True) -> list[int]:
        logits, past = self.forward(tokens, None, options)
        out: list[int] = []
        while len(out) < n:
            out.append(int(np.argmax(logits[-1])))
            if (stop_at_eos and out[-1] in self.eos) or len(out) == n:
                break
            logits, past = self.forward(out[-1:], past, options)
        return out



def measure_decoder(session, rec, shapes, warmup: int, runs: int, reference) -> dict:
    """The decoder latency protocol of :func:`loradeploy.timing.time_decoder` on this session's
    KV-cache decoder, then what switching adapters costs next to reloading the session."""
    from ...timing import time_decoder

    decoder = session.decoder()
    options = {True: session.run_options(rec), False: session.run_options(None)}

    def token(i: int) -> int:  # arbitrary ordinary tokens, within any vocabulary
        return 3 + (1000 + i) % (decoder.vocab - 3)

    def prompt(with_adapter: bool, seq: int):
        tokens = [2] + [token(i) for i in range(seq - 1)]
        return lambda: decoder.forward(tokens, None, options[with_adapter])

    def generation(with_adapter: bool, n: int):
        start = [2, token(0), token(1), token(2)]

        def run():
            logits, past = decoder.forward(start, None, options[with_adapter])
            for i in range(n):
                logits, past = decoder.forward([token(i)], past, options[with_adapter])
        return run

    out = time_decoder(prompt, generation, [seq for _, seq in shapes], warmup, runs, reference)
    if rec is not None:
        out["generation"].update(_switch_vs_reload(session, rec))
    return out


def _switch_vs_reload(session, rec) -> dict:
    """Loading the adapter file, switching (a run's options naming another adapter) and reloading
    the whole session, in ms."""
    import onnxruntime as ort

    out = {}
    t0 = time.perf_counter()
    ort.LoraAdapter().Load(str(rec.info.path))
    out["adapter_load_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    for _ in range(100):
        session.run_options(rec)
        session.run_options(None)
    out["adapter_switch_ms"] = (time.perf_counter() - t0) * 1e3 / 200
    t0 = time.perf_counter()
    inference_session(session.artifact / MODEL_FILE)
    out["model_reload_ms"] = (time.perf_counter() - t0) * 1e3
    out["reload_over_switch"] = out["model_reload_ms"] / out["adapter_switch_ms"]
    return out
