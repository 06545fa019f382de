"""A node out of memory: Ray's memory monitor kills a trial worker. Tune (Ray 2.60) hands the kill back either as
that trial's error (the trial is FAILED with the cause, the sweep goes on) or, when it reaches its actor manager, as an
error that ends the whole experiment: then the sweep stops like an interruption (one line, exit 75, runs KILLED) and
`--resume` runs it to the end once memory is free. Never a traceback (before: `AttributeError` on a trial error Tune
kept as text: exit 1).

The integration test gets a real kill from Ray's own monitor: a local cluster started with the memory threshold
(`RAY_memory_usage_threshold`) below what any node already uses, so the monitor kills the first trial worker it sees.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ray.exceptions import OutOfMemoryError
from test_search import _mlflow_trials, _space_file, sweep_env  # noqa: F401 - a fixture

from cleansweep import tracking
from cleansweep.sweep import records


def test_an_out_of_memory_kill_is_found_anywhere_in_the_chain():
    oom = OutOfMemoryError("Task was killed due to the node running low on memory.")
    try:
        try:
            raise oom
        except OutOfMemoryError as e:
            raise RuntimeError(f"Caught unexpected exception: {e}") from e  # as Tune's actor manager does
    except RuntimeError as tune_error:
        assert records.out_of_memory(tune_error) is oom
    assert records.out_of_memory(RuntimeError("something else")) is None
    looped = RuntimeError("a")
    looped.__context__ = looped  # a cycle in the chain ends the walk
    assert records.out_of_memory(looped) is None


@pytest.mark.integration
def test_a_sweep_whose_worker_ray_kills_for_memory_stops_in_one_line_and_resumes(sweep_env, tiny_checkpoint):  # noqa: F811
    extra = """
    epochs: 2
    base: {optim.warmup_steps: 2}
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search: {algorithm: optuna, num_samples: 2, max_concurrent: 2}
    scheduler: {name: none}
    """
    space = _space_file(sweep_env, tiny_checkpoint["checkpoint"], tiny_checkpoint["world"], extra)
    workdir = sweep_env / "work"
    argv = [sys.executable, "-m", "cleansweep", "search", str(space), "--name", "oom", "--workdir", str(workdir)]
    starved = {**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1", "RAY_memory_usage_threshold": "0.01",
               "RAY_memory_monitor_refresh_ms": "100"}
    first = subprocess.run(argv, env=starved, capture_output=True, text=True, timeout=600)
    # Tune logs each failed trial's traceback itself; the command never crashes with one of its own (exit 1).
    assert first.returncode in (0, 75), first.stderr[-3000:]
    parent, children = _mlflow_trials(workdir, "oom")
    if first.returncode == 0:
        # The kill reached Tune as each trial's error: the trials are FAILED with the monitor's cause (not retried:
        # the same config on the same node runs out of memory again), the sweep is over and says none is feasible.
        # A worker killed before its trial function ran leaves no child run (known gap: the trial is FAILED in Tune).
        assert parent.info.status == "FINISHED" and len(children) <= 2
        for c in children:
            assert c["run"].info.status == "FAILED"
            assert "memory" in c["run"].data.tags.get("cleansweep.error", "").lower()
        return
    # The kill reached Tune's actor manager, which ends the experiment: one line, exit 75, resumable.
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert first.returncode == 75, first.stderr[-3000:]
    assert len(errors) == 1 and "memory monitor killed a trial worker" in errors[0] and "--resume" in errors[0]
    assert parent.info.status == "KILLED"
    fed = {k: v for k, v in starved.items() if not k.startswith("RAY_memory")}
    second = subprocess.run([*argv, "--resume"], env=fed, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    parent, children = _mlflow_trials(workdir, "oom")
    children = [c for c in children if tracking.LOST_TAG not in c["run"].data.tags]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c["run"].info.status == "FINISHED" for c in children)
