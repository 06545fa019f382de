"""Ctrl-C after a finished sweep still interrupts: Tune's SIGINT handler does not outlive its run."""

from __future__ import annotations

import os
import signal
import time

import pytest
from ray.tune.tune import _setup_signal_catching

from cleansweep.runtime import interrupts


def test_tunes_sigint_handler_is_gone_after_the_run_and_ctrl_c_raises_again():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.tune_signal_handlers_removed_after():
        stop = _setup_signal_catching()  # what Tuner.fit does at its start (ray/tune/tune.py)
        assert signal.getsignal(signal.SIGINT) is not before  # Tune's handler is in place during the run
    assert signal.getsignal(signal.SIGINT) is before
    # Without the restore, this Ctrl-C would only set the finished run's stop flag and the program would go on.
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the handler runs at the next bytecode boundary: well before this ends
    assert not stop.is_set()


def test_without_the_restore_tune_swallows_the_next_ctrl_c():
    """The failure the restore prevents, shown on Tune itself (so the test above cannot pass vacuously)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        stop = _setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: Tune's handler takes it
        assert stop.wait(2)
    finally:
        signal.signal(signal.SIGINT, before)
