"""A full disk (cleansweep.runtime.diskguard): one line naming the path, the state a resume needs never truncated, and a
sweep stopped in time resumes with nothing lost.

Fast tests check the free-space arithmetic against `os.statvfs`, the guard's stop through the SIGINT handler, the
state copies and the one-line mapping. Integration tests fill a real tmpfs (mounted here: CI runs as root): the CLI
on a full disk, and a sweep whose disk fills after its first results, then `--resume` once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import _mlflow_trials, _space_file, sweep_env  # noqa: F401 - a fixture

from cleansweep import cli, tracking
from cleansweep.errors import DiskFull
from cleansweep.objective import TOP1
from cleansweep.runtime import diskguard

HUGE_MB = str(2**40)  # more than any disk: every check is below the reserve


def test_free_bytes_is_what_statvfs_gives_an_unprivileged_writer(tmp_path):
    st = os.statvfs(tmp_path)
    free = diskguard.free_bytes(tmp_path / "not" / "yet" / "made")  # the nearest existing folder's filesystem
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 2**20  # other writers may use the disk in between


def test_reserve_comes_from_the_environment():
    assert diskguard.reserve_bytes({}) == 256 * 2**20
    assert diskguard.reserve_bytes({diskguard.RESERVE_ENV: "1.5"}) == int(1.5 * 2**20)


def test_check_space_refuses_with_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv(diskguard.RESERVE_ENV, "1")
    diskguard.check_space([tmp_path], "s")  # 1 MB free: fine
    monkeypatch.setenv(diskguard.RESERVE_ENV, HUGE_MB)
    with pytest.raises(DiskFull) as e:
        diskguard.check_space([tmp_path / "sweeps" / "s"], "s")
    line = str(e.value)
    assert "\n" not in line and f"at {tmp_path / 'sweeps' / 's'} (" in line and "--name s --resume" in line
    assert f"({diskguard.free_bytes(tmp_path) / 2**20:.0f} MB free" in line
    assert list(tmp_path.iterdir()) == []  # a refusal writes nothing


def test_the_guard_stops_tune_like_ctrl_c_once_and_only_below_the_reserve(tmp_path, monkeypatch):
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # stands in for Tune's
    try:
        guard = diskguard.DiskGuard([tmp_path], tmp_path / "main", every_s=0.0)
        monkeypatch.setenv(diskguard.RESERVE_ENV, "1")
        guard.on_step_end(1, [])
        assert calls == []
        diskguard.raise_if_tripped(tmp_path / "main", "s")  # not tripped: nothing raised
        monkeypatch.setenv(diskguard.RESERVE_ENV, HUGE_MB)
        guard.on_step_end(2, [])
        guard.on_step_end(3, [])
        assert calls == [signal.SIGINT]  # once: Tune's handler restores the default one after the first call
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(DiskFull, match=f"disk nearly full at {tmp_path} .*the sweep stopped and saved its state"):
        diskguard.raise_if_tripped(tmp_path / "main", "s")
    diskguard.raise_if_tripped(tmp_path / "main", "s")  # reported once


def test_the_guard_rate_limits_its_checks(tmp_path, monkeypatch):
    monkeypatch.setenv(diskguard.RESERVE_ENV, "1")
    guard = diskguard.DiskGuard([tmp_path], tmp_path, every_s=3600.0)
    guard.on_step_end(1, [])
    monkeypatch.setenv(diskguard.RESERVE_ENV, HUGE_MB)
    guard.on_step_end(2, [])  # within the hour: not checked again
    diskguard.raise_if_tripped(tmp_path, "s")


def test_a_truncated_state_file_gets_its_last_complete_copy_back(tmp_path):
    exp = tmp_path / "main"
    exp.mkdir()
    state = exp / "experiment_state-2026.json"
    searcher = exp / "searcher-state-2026.pkl"
    state.write_text(json.dumps({"trial_data": [1, 2, 3]}))
    import pickle

    searcher.write_bytes(pickle.dumps({"n": 3}))
    diskguard.keep_state(exp)
    state.write_text("")  # what ENOSPC between Tune's open("w") and its write leaves
    searcher.write_bytes(pickle.dumps({"n": 3})[:5])
    diskguard.keep_state(exp)  # an incomplete file never replaces the kept copy
    assert sorted(diskguard.repair_state(exp)) == [state.name, searcher.name]
    assert json.loads(state.read_text()) == {"trial_data": [1, 2, 3]}
    assert pickle.loads(searcher.read_bytes()) == {"n": 3}
    assert diskguard.repair_state(exp) == []
    (exp / "experiment_state-2027.json").write_text("{")  # no copy kept: removed, Tune reads the older one
    assert diskguard.repair_state(exp) == ["experiment_state-2027.json"]
    assert not (exp / "experiment_state-2027.json").exists()


def test_enospc_anywhere_in_the_chain_is_one_line():
    err = OSError(errno.ENOSPC, "No space left on device", "/data/sweeps/x/main/trial/checkpoint")
    assert diskguard.disk_full_line(err) == ("error: disk full at /data/sweeps/x/main/trial/checkpoint; nothing "
                                             "reported so far is lost: free space there and re-run the same command "
                                             "with --resume")
    try:  # SQLite's own words, wrapped the way MLflow wraps a failed write
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("(sqlite3.OperationalError) could not log metrics") from inner
    except RuntimeError as wrapped:
        assert diskguard.disk_full_line(wrapped).startswith("error: disk full at ")
    assert diskguard.disk_full_line(ValueError("no")) is None
    assert diskguard.disk_full_line(OSError(errno.EACCES, "Permission denied")) is None


# ------------------------------------------------------------------------------------------------ integration
@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 GB tmpfs (memory only as far as it is written; its own filesystem, so filling it is safe); skipped where
    mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about `leave_bytes` free on `disk`."""
    filler = disk / "filler"
    chunk = b"\0" * 2**20
    with open(filler, "ab") as f:
        while diskguard.free_bytes(disk) > leave_bytes + len(chunk):  # others may be writing to the disk meanwhile
            f.write(chunk)
            f.flush()
    if leave_bytes == 0:  # the last MB too, to the last block
        with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        assert diskguard.free_bytes(disk) < 4096
    return filler


@pytest.mark.integration
def test_the_cli_on_a_full_disk_says_one_line(small_disk, capsys):
    _fill(small_disk, 0)
    code = cli.main(["data", "demo", "--out", str(small_disk / "world"), "--n-train", "64", "--n-clean", "8",
                     "--n-eval", "30"])
    err = capsys.readouterr().err.strip()
    assert code == diskguard.EXIT_CODE and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: disk full at {small_disk}/") and ".png;" in err, err  # the file being written


def _evaluations_logged(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from metrics where key = ?", (TOP1,)).fetchone()[0]
    except sqlite3.Error:  # the sweep is writing it
        return 0


def _trial_error(inner: BaseException) -> BaseException:
    """The error Tune records for a trial that raised `inner`: Ray's RayTaskError, as the driver unpickles it."""
    from ray.exceptions import RayTaskError

    try:
        raise inner
    except BaseException as e:  # noqa: BLE001 - any trial error
        return RayTaskError("clean_trial", "Traceback (most recent call last): ...", e).as_instanceof_cause()


def test_a_trial_that_hit_a_full_disk_stops_the_stage_before_it_is_closed():
    from types import SimpleNamespace

    from cleansweep.sweep import records as tune_records
    from cleansweep.sweep.lifecycle import AlreadyFailed

    enospc = _trial_error(OSError(errno.ENOSPC, "No space left on device", "/mnt/work/sweeps/x/ckpt"))
    diverged = _trial_error(FloatingPointError("evaluation metric zeroshot_top1 is nan; the model diverged"))
    grid = [SimpleNamespace(error=None), SimpleNamespace(error=diverged), SimpleNamespace(error=enospc)]
    with pytest.raises(DiskFull) as got:
        diskguard.raise_if_trials_hit_full_disk(grid, "sw")
    assert str(got.value).startswith("1 trial(s) stopped by a full disk at /mnt/work/sweeps/x/ckpt;")
    assert "--name sw --resume" in str(got.value)
    diskguard.raise_if_trials_hit_full_disk(grid[:2], "sw")  # a diverged trial is a verdict, not a full disk
    # A trial a resume restored although it had failed keeps its first cause (the driver skips re-tagging it).
    again = _trial_error(AlreadyFailed("trial t failed before this resume and is not run again (x)"))
    assert tune_records.error_is(again, AlreadyFailed)
    assert not tune_records.error_is(diverged, AlreadyFailed) and not tune_records.error_is(None, OSError)


@pytest.mark.integration
def test_a_sweep_stopped_by_a_full_disk_resumes_with_nothing_lost(sweep_env, small_disk, tiny_checkpoint):  # noqa: F811
    # 12 epochs: on an idle machine 3 ended the whole sweep before the filler took the disk and the guard looked.
    extra = """
    epochs: 12
    eval_every: 1
    base: {optim.warmup_steps: 2}
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search: {algorithm: optuna, num_samples: 4, max_concurrent: 2}
    scheduler: {name: none}
    """
    space = _space_file(sweep_env, tiny_checkpoint["checkpoint"], tiny_checkpoint["world"], extra)
    workdir = small_disk / "work"  # sweeps/ and mlflow.db on the small disk
    argv = [sys.executable, "-m", "cleansweep", "search", str(space), "--name", "df", "--workdir", str(workdir)]
    env = {**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1", diskguard.RESERVE_ENV: "400"}
    log = sweep_env / "first.log"
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        deadline = time.monotonic() + 300
        while _evaluations_logged(workdir / "mlflow.db") < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
        assert proc.poll() is None, "the sweep ended before its first evaluation"
        filler = _fill(small_disk, 300 * 2**20)  # below the 400 MB reserve, room for a few checkpoints and the snapshot
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    stderr = log.read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == diskguard.EXIT_CODE, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: disk nearly full at {small_disk}"), stderr[-3000:]
    assert "--name df --resume" in errors[0] and "Traceback" not in stderr
    main = workdir / "sweeps" / "df" / "main"
    states = sorted(main.glob("experiment_state-*.json"))
    assert states and all(json.loads(p.read_text()) for p in states)  # complete, parseable state
    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    runs = client.search_runs([client.get_experiment_by_name("cleansweep").experiment_id], max_results=1000)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if r.data.tags.get("cleansweep.kind") == "trial"} <= {"FINISHED", "KILLED"}

    filler.unlink()
    second = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    parent, children = _mlflow_trials(workdir, "df")
    children = [c for c in children if tracking.LOST_TAG not in c["run"].data.tags]
    assert parent.info.status == "FINISHED" and len(children) == 4
    for c in children:  # every trial ran all 12 evaluations, each logged once
        assert c["run"].info.status == "FINISHED" and sorted(c["steps"]) == sorted(set(c["steps"]))
        assert len(c["steps"]) == 12, c["steps"]
