"""The one SIGTERM shim: Kubernetes stops pods with SIGTERM, but Tune saves its final experiment snapshot on SIGINT
(and SIGUSR1) only: `_setup_signal_catching` in ray/tune/tune.py installs its handler for those two, and the
`tune.run` docstring says SIGTERM skips the final checkpoint. Python's default for SIGTERM is to die without
cleanup. Inside `sigterm_as_sigint`, SIGTERM takes the SIGINT path: Tune's handler while a Tuner runs,
KeyboardInterrupt elsewhere (the CLI turns that into "interrupted: ... re-run with --resume", exit 130).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Within the block, SIGTERM is handled as SIGINT would be at that moment; outside the main thread (where
    signal handlers cannot be set) the block runs unchanged."""
    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def tune_signal_handlers_removed_after() -> Iterator[None]:
    """Restore SIGINT's and SIGUSR1's handlers when the block ends.

    Tune's `_setup_signal_catching` (ray/tune/tune.py) installs its own SIGINT handler for a run and puts the old one
    back only when a signal arrives: after a run that ended by itself, the next Ctrl-C in the same process (the
    matrix's or the study's next in-process pre-training) would only set the finished run's stop flag and be lost.
    """
    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    try:
        saved = {n: signal.getsignal(getattr(signal, n)) for n in names}
    except ValueError:
        saved = {}
    try:
        yield
    finally:
        for name, handler in saved.items():
            try:
                signal.signal(getattr(signal, name), handler)
            except (ValueError, TypeError):  # not the main thread, or a handler set from C
                pass
