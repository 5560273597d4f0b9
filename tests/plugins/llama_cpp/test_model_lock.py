"""llama.cpp walks a model's set of initialised adapters whenever a context reserves a graph, so
an adapter init/free on the model must never overlap a decode on any context (a soak crashed in
``libllama.so`` that way). ``ModelLock`` and its wiring in the llama.cpp session."""

from __future__ import annotations

import threading
import time

import pytest

from loradeploy import runtime
from loradeploy.base import resolve_base
from loradeploy.job import AdapterSpec
from loradeploy.plugins.llama_cpp.model_lock import ModelLock
from tests.support.profiles import quick_profile
from tests.support.exports import export_adapters
from tests.support import tiny_llama


def _started(fn) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run():
        fn()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def test_exclusive_waits_for_readers_and_blocks_new_ones():
    lock = ModelLock()
    reader_in, reader_out = threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            reader_in.set()
            reader_out.wait(5)

    r, _ = _started(reader)
    assert reader_in.wait(5)
    held = []  # the entered context managers (a collected one would release)

    def enter(cm):
        held.append(cm)
        cm.__enter__()

    w, wrote = _started(lambda: enter(lock.exclusive()))
    time.sleep(0.2)
    assert not wrote.is_set()  # a reader holds it
    late, late_in = _started(lambda: enter(lock.shared()))
    time.sleep(0.2)
    assert not late_in.is_set()  # a writer waits: new readers wait behind it
    reader_out.set()
    assert wrote.wait(5)
    time.sleep(0.2)
    assert not late_in.is_set()  # the writer has not released yet
    held[0].__exit__(None, None, None)
    assert late_in.wait(5)


def test_the_only_reader_may_take_it_exclusive():
    """A thread that is the only reader upgrades to exclusive (and re-enters exclusive, and
    shared inside it) without waiting on itself; while it holds it exclusive another thread's
    reader waits, and once it has let go of everything another thread takes it exclusive."""
    lock = ModelLock()
    events: list[str] = []
    other: list[threading.Event] = []
    owner_may_end = threading.Event()  # a finished thread's id may be reused by the next one

    def other_reader():
        with lock.shared():
            events.append("other reader in")

    def owner():
        with lock.shared(), lock.exclusive():
            events.append("upgraded")
            other.append(_started(other_reader)[1])
            time.sleep(0.2)
            events.append("upgrade released")
        with lock.exclusive(), lock.exclusive(), lock.shared():
            events.append("nested")
        events.append("owner done")
        owner_may_end.wait(10)

    _, done = _started(owner)
    try:
        assert "owner done" in _events_within(events, 5), f"the only reader waited on itself: {events}"
        assert other[0].wait(5), "the other reader never got in"
        _, writer_in = _started(lambda: lock.exclusive().__enter__())
        assert writer_in.wait(5), "the lock was not fully released"
    finally:
        owner_may_end.set()
    # the other reader got in after the upgrade was released (before or after the nested part)
    assert [e for e in events if e != "other reader in"] == ["upgraded", "upgrade released", "nested", "owner done"]
    assert events.index("other reader in") > events.index("upgrade released"), events


def _events_within(events: list[str], seconds: float, last: str = "owner done") -> list[str]:
    """``events`` once ``last`` is in it, or after ``seconds``."""
    end = time.monotonic() + seconds
    while last not in events and time.monotonic() < end:
        time.sleep(0.01)
    return events


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock")
    _, gguf_path = tiny_llama.build(folder, resolve_base("gemma3-270m"))
    specs = [AdapterSpec(f"a{i}", tiny_llama.sora_adapter(folder / f"a{i}", seed=i)) for i in (1, 2)]
    eval_file = folder / "eval.txt"
    eval_file.write_text("The hotel room was\nI would buy this again\n")
    export_adapters(str(gguf_path), specs, quick_profile(folder, "gguf-cpu", precision="f32"), folder / "art",
                    eval_path=eval_file)
    return folder / "art"


@pytest.mark.slow
def test_decodes_wait_while_an_adapter_is_initialised_or_freed(tiny_art):
    session = runtime.open(tiny_art, workers=2)
    request = session.encode(["The hotel room was"])
    want = session.run(request, "a1").outputs
    with session._model_lock.exclusive():  # as load_adapter / unload_adapter hold it
        _, ran = _started(lambda: session.run(request, "a1"))
        time.sleep(0.5)
        assert not ran.is_set()
    assert ran.wait(10)
    assert (session.run(request, "a1").outputs == want).all()
    session.close()


@pytest.mark.slow
def test_loads_wait_while_a_context_decodes(tiny_art):
    session = runtime.open(tiny_art, workers=2)
    worker = session._acquire(None)  # a caller in the middle of a decode
    try:
        _, loaded = _started(lambda: session.load_adapter("late", tiny_art / "adapters" / "a2.gguf"))
        time.sleep(0.5)
        assert not loaded.is_set()
    finally:
        session._release(worker)
    assert loaded.wait(10) and "late" in session.adapters
    session.unload_adapter("late")
    session.close()
