"""Disk space for sweeps: refuse to start on a nearly full disk, stop in time, never lose the state a resume needs.

A sweep writes to its folder (Tune's experiment state, trial checkpoints), the MLflow database and artifacts, and the
node's temp folder (in-flight checkpoints: `scratch`; Ray's session folder). On a full disk, Tune's experiment state
is lost: `TuneController.save_to_dir` (ray/tune/execution/tune_controller.py) opens `experiment_state-*.json` with
"w" and then writes, and the storage sync copies it over the previous copy, so ENOSPC between the two leaves a 0-byte
file and `Tuner.restore` fails on it; trials hitting ENOSPC end as errors, which a resume does not rerun.

- `check_space`: before a sweep starts or resumes, every place it writes has `reserve_bytes()` free, or one line
  naming the path, its free MB and the fix (`DiskFull`).
- `DiskGuard`: a Tune callback on the driver that re-checks every few seconds and, below the reserve, stops the
  experiment through Tune's own SIGINT handler (what Ctrl-C does: running trials are paused, a final snapshot is
  written while there is still room); `raise_if_tripped` then ends the stage with `DiskFull`. It also keeps a copy of
  the last complete experiment state (written atomically), which `repair_state` puts back before a resume.
- `disk_full_line`: the one line the CLI prints for `DiskFull` or for an ENOSPC that got through anyway (an OSError,
  or SQLite's "database or disk is full" inside MLflow's exception), with exit code `EXIT_CODE`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray import tune

from cleansweep.errors import DiskFull
from cleansweep.runtime import atomic

RESERVE_ENV = "CLEANSWEEP_DISK_RESERVE_MB"
DEFAULT_RESERVE_MB = 256  # a few checkpoints of the models we sweep, the final snapshot and MLflow's last writes
EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): retry later, after freeing space
BACKUP_DIR = ".last-good-state"  # in each Tune experiment folder
_FULL_TEXT = ("No space left on device", "database or disk is full", "Disk quota exceeded")
_watched: list[Path] = []  # what this driver checked last: names the path in `disk_full_line`
_tripped: dict[str, tuple[str, int]] = {}  # experiment folder -> (path, free bytes) when its DiskGuard stopped it


def reserve_bytes(env: dict[str, str] | None = None) -> int:
    """Free space every written place must keep: $CLEANSWEEP_DISK_RESERVE_MB, else 256 MB."""
    value = (os.environ if env is None else env).get(RESERVE_ENV, "")
    try:
        return int(float(value) * 2**20) if value else DEFAULT_RESERVE_MB * 2**20
    except ValueError:
        return DEFAULT_RESERVE_MB * 2**20


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem of `path` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def sweep_paths(sweep_dir: Path, tracking_uri: str) -> list[Path]:
    """Where a sweep writes on this machine: its folder, the SQLite MLflow database's folder (artifacts beside it)
    and the temp folder (scratch checkpoints, Ray's session folder)."""
    paths = [Path(sweep_dir)]
    if tracking_uri.startswith("sqlite:///"):
        paths.append(Path(tracking_uri[len("sqlite:///"):]).parent)
    paths.append(Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()))
    return paths


def lowest(paths: Iterable[Path]) -> tuple[Path, int]:
    """The path with the least free space (one per filesystem) and its free bytes."""
    return min(((Path(p), free_bytes(p)) for p in paths), key=lambda pf: pf[1])


def message(path: Path, free: int, name: str, *, stopped: bool) -> str:
    """The one line for a nearly full disk."""
    what = "the sweep stopped and saved its state" if stopped else "refusing to start"
    return (f"disk nearly full at {path} ({free / 2**20:.0f} MB free, {reserve_bytes() / 2**20:.0f} MB reserve "
            f"needed): {what}; free space there and run `cleansweep search ... --name {name} --resume` "
            f"(or lower ${RESERVE_ENV})")


def check_space(paths: list[Path], name: str, *, stopped: bool = False) -> None:
    """Raise `DiskFull` unless every path has the reserve free."""
    _watched[:] = [Path(p) for p in paths]
    path, free = lowest(paths)
    if free < reserve_bytes():
        raise DiskFull(message(path, free, name, stopped=stopped))


def disk_full_line(exc: BaseException | str) -> str | None:
    """"error: ..." for a `DiskFull`, or for an ENOSPC anywhere in the exception's chain; None for anything else."""
    if isinstance(exc, DiskFull):
        return f"error: {exc}"
    if not isinstance(exc, BaseException):  # Tune hands some trial errors back as their text only
        exc = RuntimeError(str(exc))
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or \
                any(text in str(e) for text in _FULL_TEXT):
            where = getattr(e, "filename", None) or _path_written(e) or \
                (lowest(_watched)[0] if _watched else "the working folder")
            return (f"error: disk full at {where}; nothing reported so far is lost: free space there and re-run "
                    "the same command with --resume")
        cause = getattr(e, "cause", None)  # a trial's error as Ray hands it to the driver: RayTaskError(cause)
        e = e.__cause__ or e.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None


def _path_written(exc: BaseException) -> str | None:
    """The file being written when `exc` was raised, from the innermost frame that names one (`filename`, `path`,
    an open file's name): `write()` errors carry no file name (e.g. Pillow's `Image.save`)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for key in ("filename", "path", "fp", "f", "file"):
            value = frame.f_locals.get(key)
            name = getattr(value, "name", value) if not isinstance(value, str | os.PathLike) else value
            if isinstance(name, str | os.PathLike) and os.sep in os.fspath(name):
                return os.fspath(name)
    return None


# ------------------------------------------------------------------------------------------------ state copies
def _complete(path: Path) -> bool:
    """Whether a Tune state file was written to the end: JSON that parses, or a pickle ending in its STOP opcode."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
            return True
        data = path.read_bytes()
        return data.endswith(b".")
    except (OSError, ValueError):
        return False


def _state_files(experiment_dir: Path) -> list[Path]:
    return sorted([*experiment_dir.glob("experiment_state-*.json"), *experiment_dir.glob("searcher-state-*.pkl")])


def keep_state(experiment_dir: Path) -> None:
    """Copy each complete, changed state file of the experiment into its `BACKUP_DIR` (atomically: a failed copy
    leaves the previous one)."""
    backup = Path(experiment_dir) / BACKUP_DIR
    for f in _state_files(Path(experiment_dir)):
        kept = backup / f.name
        try:
            if kept.is_file() and kept.stat().st_mtime_ns >= f.stat().st_mtime_ns or not _complete(f):
                continue
            backup.mkdir(exist_ok=True)
            atomic.write_atomic(kept, lambda tmp, src=f: shutil.copy2(src, tmp))
        except OSError:
            return  # no room for the copy: the previous one stays


def repair_state(experiment_dir: Path) -> list[str]:
    """Before a resume: put the kept copy back over every truncated state file (none kept: remove it, so Tune reads
    an older complete one). Returns the names repaired."""
    repaired = []
    for f in _state_files(Path(experiment_dir)):
        if _complete(f):
            continue
        kept = Path(experiment_dir) / BACKUP_DIR / f.name
        if kept.is_file() and _complete(kept):
            atomic.write_atomic(f, lambda tmp, src=kept: shutil.copy2(src, tmp))
        else:
            f.unlink()
        repaired.append(f.name)
    return repaired


# ------------------------------------------------------------------------------------------------ during a sweep
class DiskGuard(tune.Callback):
    """Driver side: every `every_s` seconds, check free space on `paths` and keep a copy of the experiment state;
    below the reserve, stop the experiment as Ctrl-C does (see the module docstring)."""

    def __init__(self, paths: list[Path], experiment_dir: Path, every_s: float = 2.0):
        self.paths, self.experiment_dir, self.every_s = [Path(p) for p in paths], Path(experiment_dir), every_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last < self.every_s or str(self.experiment_dir) in _tripped:
            return
        self._last = time.monotonic()
        path, free = lowest(self.paths)
        if free >= reserve_bytes():
            keep_state(self.experiment_dir)
            return
        _tripped[str(self.experiment_dir)] = (str(path), free)
        handler = signal.getsignal(signal.SIGINT)  # Tune's, while `Tuner.fit` runs in the main thread
        if callable(handler) and handler not in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL):
            handler(signal.SIGINT, None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": 0.0}


def raise_if_tripped(experiment_dir: Path, name: str) -> None:
    """After `Tuner.fit`: `DiskFull` if this experiment's guard stopped it."""
    hit = _tripped.pop(str(experiment_dir), None)
    if hit is not None:
        raise DiskFull(message(Path(hit[0]), hit[1], name, stopped=True))


def raise_if_trials_hit_full_disk(grid: Any, name: str) -> None:
    """After `Tuner.fit`: `DiskFull` if a trial failed on a full disk the guard did not see coming (a burst of
    checkpoints inside one check period). Raised before the stage is closed, so those trials keep their resume
    state, and `--resume` runs them on (`search.run_stage` restores errored trials too)."""
    hit = [r for r in grid if r.error is not None and disk_full_line(r.error) is not None]
    if hit:
        where = disk_full_line(hit[0].error).removeprefix("error: disk full at ").split(";")[0]
        raise DiskFull(f"{len(hit)} trial(s) stopped by a full disk at {where}; their results so far are kept: free "
                       f"space there and run `cleansweep search ... --name {name} --resume` to finish them")
