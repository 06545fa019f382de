"""How a sweep's trials end, on the driver side: each trial's MLflow run says FINISHED (`stopped_early` when it had
epochs left) or FAILED (with its cause), points at its best checkpoint as Tune persisted it, and a finished trial's
resume-only state is dropped.

`TrialEndCallback` does it as Tune ends each trial; `settle_statuses` catches, once a stage is over, what a killed
driver missed. A trial whose run is FAILED and that a resume restored refuses at once with `AlreadyFailed`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ray import tune
from ray.train.constants import CHECKPOINT_DIR_NAME

from cleansweep import tracking
from cleansweep.objective import BEST_STEP, EPOCH, FEASIBLE, STEP
from cleansweep.runtime import diskguard, layout, storage
from cleansweep.sweep import records

RESUME_STATE = layout.STATE_FILE


class AlreadyFailed(RuntimeError):
    """A trial that ended FAILED before a resume was restored by it: it is not run again, and keeps its cause."""


class TrialEndCallback(tune.Callback):
    """Driver side: ends the MLflow run of every trial Tune completed (FINISHED, `stopped_early` when it had epochs
    left) or that errored (FAILED, with its cause), points each run at its best checkpoint as Tune persisted it, and
    drops the resume state a finished trial no longer needs.

    A few light MLflow calls per trial (the run id comes with the trial's results), nothing per plain result.
    """

    def __init__(self, tracking_uri: str, epochs: float, sweep: str = "", experiment_id: str = ""):
        self.tracking_uri = tracking_uri
        self.epochs = epochs
        self.sweep, self.experiment_id = sweep, experiment_id
        self._client = None

    def _client_for(self) -> Any:
        if self._client is None:
            self._client = tracking.open_client(self.tracking_uri)
        return self._client

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """Tag the run with the path of the checkpoint just persisted when it holds the trial's new best feasible
        evaluation. Tune processes a trial's result, then its save, before it runs the trial on, so the trial's
        last result is this checkpoint's (its `checkpoint_dir_name` says so; anything else is not tagged)."""
        result = trial.last_result or {}
        run_id, step = result.get("mlflow_run_id"), result.get(STEP)
        if not run_id or step is None or not result.get(FEASIBLE) or int(result.get(BEST_STEP, -1)) != int(step):
            return
        if Path(checkpoint.path).name != result.get(CHECKPOINT_DIR_NAME):
            return
        with contextlib.suppress(Exception):  # never let bookkeeping kill the sweep: the end-of-sweep check is loud
            # A URI when Tune persisted it to object storage (`checkpoint.path` is then the path in the bucket).
            where = storage.uri_of(checkpoint.filesystem, checkpoint.path)
            tracking.record_best_checkpoint(self._client_for(), run_id, where, int(step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("mlflow_run_id"):
            with contextlib.suppress(Exception):  # never let bookkeeping kill the sweep
                stopped = float(result.get(EPOCH, 0.0)) < self.epochs - 1e-6
                tracking.finish_trial(self._client_for(), result["mlflow_run_id"], stopped_early=stopped)
        # Not from the latest checkpoint yet: a driver killed before its next snapshot resumes the trial from it.
        drop_resume_state(trial.path, keep_latest=True, filesystem=getattr(trial.storage, "storage_filesystem", None))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with contextlib.suppress(Exception):
            client = self._client_for()
            run_id = (trial.last_result or {}).get("mlflow_run_id") or (
                self.sweep and tracking.find_trial_run(client, self.experiment_id, self.sweep, trial.trial_id))
            error = records.recorded_error(trial)
            if not run_id or records.error_is(error, AlreadyFailed):  # it keeps the cause it failed with
                return
            if error is not None and diskguard.disk_full_line(error) is not None:  # resumable, not a verdict
                tracking.end_if_running(client, run_id, "KILLED")
                return
            tracking.fail_trial(client, run_id, records.failure_cause(error))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}


def settle_statuses(grid: tune.ResultGrid, tracking_uri: str, epochs: float) -> None:
    """Once a stage is over, every trial's run says how it ended: FINISHED (+ `stopped_early`) or FAILED.

    The callback does it as trials end; this catches what a killed driver missed (a trial completed after the last
    snapshot, its callback never ran) and what an interrupt marked KILLED before a resume completed it.
    """
    client = tracking.open_client(tracking_uri)
    for result in grid:
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if not run_id:
            continue
        if result.error is not None:
            tracking.fail_trial(client, run_id, records.failure_cause(result.error))
        else:
            stopped = float((result.metrics or {}).get(EPOCH, 0.0)) < epochs - 1e-6
            tracking.finish_trial(client, run_id, stopped_early=stopped)


def drop_resume_state(trial_dir: str | None, *, keep_latest: bool, filesystem: Any = None) -> int:
    """Delete the resume-only file of a finished trial's checkpoints (the kept weights stay); returns bytes freed.

    Hundreds of trials would otherwise keep every best checkpoint at three times its weights' size.

    Args:
        trial_dir: The trial's folder (Tune's `trial.path` / `result.path`).
        keep_latest: Keep it in the latest checkpoint (a trial that may still resume from it).
        filesystem: The pyarrow filesystem `trial_dir` is on when it is object storage (the path is then in the
            bucket); without it a path that is not a local folder is left alone.
    """
    if trial_dir and filesystem is not None and getattr(filesystem, "type_name", "local") != "local":
        return _drop_stored_resume_state(filesystem, trial_dir, keep_latest)
    if not trial_dir or not Path(trial_dir).is_dir():
        return 0
    dirs = sorted(Path(trial_dir).glob("checkpoint_*"))
    freed = 0
    for d in dirs[:-1] if keep_latest else dirs:
        f = d / RESUME_STATE
        with contextlib.suppress(FileNotFoundError):
            freed += f.stat().st_size
            f.unlink()
    return freed


def _drop_stored_resume_state(fs: Any, trial_dir: str, keep_latest: bool) -> int:
    import pyarrow.fs

    with contextlib.suppress(OSError):  # housekeeping: an unreachable bucket must not stop the sweep
        infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
        dirs = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                      and i.base_name.startswith("checkpoint_"))
        freed = 0
        for d in dirs[:-1] if keep_latest else dirs:
            info = fs.get_file_info(f"{d}/{RESUME_STATE}")
            if info.type == pyarrow.fs.FileType.File:
                fs.delete_file(info.path)
                freed += info.size
        return freed
    return 0
