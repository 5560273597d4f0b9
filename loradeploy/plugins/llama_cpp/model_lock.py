"""A reader-writer lock on one llama.cpp model: decodes share it, initialising or freeing an
adapter on the model takes it alone (llama.cpp changes the model's adapter list then)."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class ModelLock:
    """Decoding on any context (shared) against adapter init/free (exclusive). llama.cpp keeps
    every adapter initialised on a model in the model's set (``llama_adapter_lora_init`` adds,
    ``llama_adapter_lora_free`` removes), and each context walks that set when it reserves a graph
    (``llama_context::graph_max_nodes``): an init or free while another context decodes is a data
    race that crashed a soak in ``libllama.so``. Re-entrant for a thread that holds it shared and
    is the only one (the latency worker frees an adapter it loaded while holding a context).
    Waiting writers stop new readers, so loads are not starved by a busy session."""

    def __init__(self):
        self._cv = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._waiting = 0

    @contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cv:
            while self._writer not in (None, me) or (self._waiting and me not in self._readers):
                self._cv.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cv.notify_all()

    @contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._cv:
            self._waiting += 1
            while self._writer not in (None, me) or any(t != me for t in self._readers):
                self._cv.wait()
            self._waiting -= 1
            before, self._writer = self._writer, me
        try:
            yield
        finally:
            with self._cv:
                self._writer = before
                self._cv.notify_all()
