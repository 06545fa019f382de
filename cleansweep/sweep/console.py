"""The live trial table a sweep prints: Tune's progress reporter in cleansweep's words (MLflow's statuses, the
sampled hyperparameters, the objective)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
from ray import tune

from cleansweep.objective import ASR, BEST, EPOCH, TOP1
from cleansweep.sweep.trial import trial_params


def _say(line: str) -> None:
    print(line)  # looked up at call time: the print of the process that unpickled the reporter


class TrialTable(tune.ProgressReporter):
    """Tune's live table in cleansweep's words: MLflow's statuses, the sampled hyperparameters, the objective."""

    STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}

    def __init__(self, params: list[str], epochs: float, every_s: float = 30.0,
                 echo: Callable[[str], None] = print):
        self.params, self.epochs, self.every_s, self.echo = params, epochs, every_s, echo
        self._last = -math.inf

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the run config into the sweep folder; `echo` may be a closure or a `print` that Ray Train has
        # since patched (builtins.print is then another object and pickling it fails), so it stays behind.
        return {**self.__dict__, "echo": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, echo=_say)

    def should_report(self, trials: list, done: bool = False) -> bool:
        return done or time.monotonic() - self._last >= self.every_s

    def report(self, trials: list, done: bool, *sys_info: Any) -> None:
        self._last = time.monotonic()
        self.echo(self.render(trials))

    def render(self, trials: list) -> str:
        """The table: one row per trial, its status, sampled values and last/best metrics."""
        rows = []
        for t in trials:
            res, params = t.last_result or {}, trial_params(t.config or {})
            status = self.STATUS.get(t.status, t.status)
            if t.status == "TERMINATED" and float(res.get(EPOCH, self.epochs)) < self.epochs - 1e-6:
                status = "FINISHED (stopped early)"
            rows.append({"trial": t.trial_id, "status": status, **{p: params.get(p) for p in self.params},
                         EPOCH: res.get(EPOCH), TOP1: res.get(TOP1), ASR: res.get(ASR), BEST: res.get(BEST)})
        counts = pd.Series([r["status"] for r in rows]).value_counts().to_dict() if rows else {}
        head = "trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        table = pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-")
        return f"{head}\n{table}" if rows else head
