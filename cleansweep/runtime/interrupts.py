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
