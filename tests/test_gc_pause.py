"""The garbage collector pause around saves and restores."""

from __future__ import annotations

import gc
import threading

import pytest

from ckpt.gc_pause import paused_gc


@pytest.fixture(autouse=True)
def _collector_back_on():
    yield
    gc.enable()


def test_pauses_nest_and_resume_the_collector_once():
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off():
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_an_exception_still_resumes_the_collector():
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_overlapping_pauses_from_two_threads():
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with paused_gc():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(5)
    with paused_gc():
        pass
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    thread.join()
    assert gc.isenabled()
