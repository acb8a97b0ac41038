"""Ctrl-C during a sweep (autoscale/search/_study.py, Note: [Ctrl-C between trials])."""

from __future__ import annotations

import os
import signal
import time

import pytest

from autoscale.search._study import _DeferredInterrupt


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs the handler at the next bytecode in the main thread


def test_a_ctrl_c_outside_a_safe_point_waits_for_one() -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with _DeferredInterrupt() as interrupts:
        _ctrl_c()  # e.g. inside Optuna's bookkeeping: noted, not raised
        assert interrupts.pending
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()  # the next trial's start
        with pytest.raises(KeyboardInterrupt), interrupts.safe():
            pass  # a noted Ctrl-C also raises on entering a safe region
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_a_measurement_is_awaited_or_a_second_one_raises_at_once() -> None:
    with _DeferredInterrupt() as interrupts:
        with pytest.raises(KeyboardInterrupt), interrupts.safe():
            _ctrl_c()
            pytest.fail("the Ctrl-C did not raise in the safe region")
        assert not interrupts.pending
        _ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()  # the user pressed it twice
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_program_with_its_own_handler_keeps_it() -> None:
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append(1))
    try:
        with _DeferredInterrupt():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            _ctrl_c()
        assert seen == [1]
    finally:
        signal.signal(signal.SIGINT, previous)
