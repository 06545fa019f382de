"""Riding out a tracking-server outage once a command has started: MLflow writes wait for the server to come back.

A command checks its tracking server once before it starts anything (`store.probe_server`: one line, seconds).
Later, a server that goes away for a few minutes (a restart, a redeploy, a network blip) must not fail hours of
trials: MLflow's own client retries a request for about four minutes (7 retries, back-off factor 2, urllib3's
120 s cap: `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `_BACKOFF_FACTOR`), then raises. `PatientClient` repeats a call
that failed only because the server was unreachable until `window_s` has passed (default 30 min, environment
variable `CLEANSWEEP_TRACKING_OUTAGE_S`), saying so once per outage; any other error is raised at once. Metrics
are never dropped: a trial waits at its evaluation, then goes on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from cleansweep.errors import UserError

WINDOW_ENV = "CLEANSWEEP_TRACKING_OUTAGE_S"
DEFAULT_WINDOW_S = 1800.0
RETRY_EVERY_S = 10.0
# What an unreachable server looks like from below MLflow's wrapper (it re-raises as MlflowException with the
# original as __context__): refused or reset connections, DNS failures, retries exhausted on 5xx answers.
_UNREACHABLE_NAMES = {"ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "MaxRetryError",
                      "NewConnectionError", "RetryError", "ProtocolError", "RemoteDisconnected", "ServerUnreachable"}


class ServerUnreachable(UserError):
    """The tracking server did not answer (raised by `store.probe_server`)."""


def window_s(env: dict[str, str] | None = None) -> float:
    """The longest outage a started command waits out, in seconds (`CLEANSWEEP_TRACKING_OUTAGE_S`)."""
    text = (os.environ if env is None else env).get(WINDOW_ENV)
    if text is None:
        return DEFAULT_WINDOW_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 7 * 24 * 3600:
        raise UserError(f"{WINDOW_ENV}={text!r} is not a number of seconds in 0..604800; fix or unset it")
    return value


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from or during) says the server could not be reached."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _UNREACHABLE_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


def call_patiently(fn: Callable[..., Any], *args: Any, what: str, window: float | None = None,
                   sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                   warn: Callable[[str], None] | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, repeated while the server is unreachable, for at most `window` seconds."""
    window = window_s() if window is None else window
    deadline: float | None = None
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_unreachable(e):
                raise
            now = clock()
            if deadline is None:
                deadline = now + window
                (warn or _stderr)(f"warning: tracking server unreachable ({what}); waiting up to {window:.0f} s for "
                                  f"it to come back (set {WINDOW_ENV} to change)")
            if now >= deadline:
                raise
            sleep(min(RETRY_EVERY_S, deadline - now))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class PatientClient:
    """An MLflow client whose every call rides out an outage (`call_patiently`); attributes pass through."""

    def __init__(self, client: Any, label: str, window: float | None = None):
        self._client = client
        self._label = label  # scheme://host:port: never a URI's credentials
        self._window = window

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not yet set (unpickling) or private: never recurse into the wrapped client
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def patient(*args: Any, **kwargs: Any) -> Any:
            return call_patiently(attr, *args, what=f"{self._label}: {name}", window=self._window,
                                  **kwargs)

        return patient
