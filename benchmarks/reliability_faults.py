"""Reliability sections `disk`, `ctrlc` and `worker`: a fault in the middle of a real sweep, then what a user sees
(exit code, stderr lines) and what the sweep left (MLflow runs by status, steps logged twice, trials completed and
lost, `--resume` to the end, `results` = a recomputation from the raw MLflow histories). See reliability.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from reliability_common import (
    CLI,
    is_lost,
    is_trial,
    markdown,
    mlflow_client,
    poisoned_model,
    run_cli,
    run_history,
    sweep_runs,
    threshold_for,
    write_space,
)
from reliability_kill import KILL_EXTRA
from reliability_store import Seen, after_resume, finished_trials, optuna_trials, tune_lines, wait_for

SETTLE_S = 900  # how long a sweep may take to end by itself after a fault before it counts as hung


class Sweep:
    """One `cleansweep search` started in its own session (Ray's processes in its process group), its stdout and
    stderr in files of its folder."""

    def __init__(self, work: Path, env: dict[str, str], space: Path, name: str, *, resume: bool = False,
                 logs: Path | None = None):
        self.work, self.name, self.env = work, name, env
        self.args = ["search", str(space), "--name", name, "--workdir", str(work)]
        tag, logs = "resume" if resume else "first", logs or work.parent
        self.out, self.err = logs / f"{name}-{tag}.out", logs / f"{name}-{tag}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([*CLI, *self.args, *(["--resume"] if resume else [])], env=env, cwd=work,
                                         stdout=out, stderr=err, start_new_session=True)
        self.t0 = time.monotonic()

    def wait_event(self, event: Any, uri: str | None = None) -> Seen | None:
        return wait_for(self.proc, self.out, self.work, self.name, event, uri=uri)

    def end(self, timeout: float = SETTLE_S) -> int | None:
        """The exit code, or None when it had not ended within `timeout` (then its group is killed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None

    def stderr_lines(self, since: int = 0) -> list[str]:
        return [line for line in self.err.read_text(errors="replace")[since:].splitlines() if line.strip()]

    def survivors(self) -> list[str]:
        """Processes of its group still alive after it ended (killed then, and named here)."""
        left = []
        for p in psutil.process_iter(["pid", "name"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.info['name']} ({p.pid})")
                    p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return left


def fault_space(root: Path, section: str, *, trials: int, epochs: int, clean_rows: int,
                extra: str = "") -> tuple[Path, float, int]:
    """The kill section's sweep (tiny backdoored model, `trials` trials of `epochs` epochs, 2 at a time): its space
    file, threshold and evaluations per trial."""
    model = poisoned_model(root, clean_rows)
    threshold = threshold_for(model)
    text = KILL_EXTRA.format(threshold=threshold, epochs=epochs, trials=trials) + extra
    space = write_space(root / section / "space.yaml", model["world"], Path(model["checkpoint"]), text)
    return space, threshold, round(epochs / 0.5)


def mid_trial(evals: int) -> Any:
    """The event 'a running trial has reported half its evaluations' (a checkpoint and an MLflow batch each)."""
    half = max(1, evals // 2)
    return lambda s, out: any(st == "RUNNING" and half <= n < evals for st, n in s.trials.values())


def fresh(root: Path, section: str) -> Path:
    work = root / section / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def resume_and_count(work: Path, env: dict[str, str], space: Path, name: str, threshold: float,
                     at_fault: dict[str, dict], tune_at_fault: dict[str, int], uri: str | None = None,
                     logs: Path | None = None) -> dict:
    """`--resume` to the end, then the counts of `after_resume`."""
    t0 = time.monotonic()
    resumed = Sweep(work, env, space, name, resume=True, logs=logs)
    code = resumed.end()
    counts = after_resume(work, name, threshold, at_fault, tune_at_fault, env, uri)
    return {"resume_exit": code, "resume_s": round(time.monotonic() - t0, 1),
            "resume_stderr_tail": resumed.stderr_lines()[-2:], **counts}


# ---------------------------------------------------------------------------------------------------- disk
def fill(folder: Path) -> int:
    """Write a file in `folder` until its file system is full (1 MiB, then 4 KiB blocks); the bytes written."""
    written = 0
    with open(folder / "filler", "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12):
            try:
                while True:
                    written += f.write(b"\0" * block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return written


def _read_json(text: str) -> None:
    """A JSON document (sweep.json, params.json: indented) or JSON lines (Tune's result.json); raises if neither."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        for line in text.splitlines():
            json.loads(line)


def broken_state(work: Path, name: str) -> list[str]:
    """Files of the sweep that no longer read: JSON (result.json line by line), pickles, an empty file, the MLflow
    database failing sqlite's integrity check."""
    import pickle

    bad = []
    for path in sorted(p for p in (work / "sweeps" / name).rglob("*") if p.is_file()):
        try:
            if path.stat().st_size == 0 and path.suffix in (".json", ".pkl", ".csv", ".yaml"):
                raise ValueError("empty")
            if path.suffix == ".json" and not path.name.startswith("search_gen_state-"):
                _read_json(path.read_text())
            elif path.suffix == ".pkl" or path.name.startswith("search_gen_state-"):  # Tune pickles into .json
                with open(path, "rb") as f:
                    pickle.load(f)  # the benchmark's own sweep wrote it
        except Exception as e:  # noqa: BLE001 - any failure to read is what is counted
            bad.append(f"{path.relative_to(work)} ({type(e).__name__})")
    with sqlite3.connect(f"file:{work / 'mlflow.db'}?mode=ro", uri=True) as con:
        check = con.execute("pragma integrity_check").fetchone()[0]
    return bad + ([] if check == "ok" else [f"mlflow.db: {check}"])


def run_disk(root: Path, env: dict[str, str], *, trials: int, epochs: int, clean_rows: int,
             size_mb: int = 1500) -> dict[str, Any]:
    """The workdir on a tmpfs of `size_mb` that a filler file fills while a trial is half done; then the filler is
    deleted and `--resume` runs. Expected: one stderr line naming the full path, no state file truncated, the
    resume finishes with nothing lost."""
    space, threshold, evals = fault_space(root, "disk", trials=trials, epochs=epochs, clean_rows=clean_rows)
    logs, mnt, name = root / "disk", root / "disk" / "mnt", "disk"
    mnt.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return {"error": f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}"}
    try:
        return _disk_full(mnt / "work", env, space, name, threshold, evals, logs)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _disk_full(work: Path, env: dict[str, str], space: Path, name: str, threshold: float, evals: int,
               logs: Path) -> dict[str, Any]:
    work.mkdir()
    sweep = Sweep(work, env, space, name, logs=logs)
    seen = sweep.wait_event(mid_trial(evals))
    if seen is None:
        return {"error": f"the sweep ended (exit {sweep.proc.returncode}) before a trial was half done"}
    at, tune_at = finished_trials(work, name), tune_lines(work / "sweeps" / name)
    t_full, filled = time.monotonic(), fill(work.parent)
    code = sweep.end()
    lines = sweep.stderr_lines()
    row = {"full_at_s": round(t_full - sweep.t0, 1), "filler_mb": round(filled / 2**20), "exit": code,
           "exit_s_after_full": round(time.monotonic() - t_full, 1), "stderr_lines": len(lines),
           "stderr_tail": lines[-3:], "names_the_path": any(str(work.parent) in line for line in lines[-3:]),
           "broken_state": broken_state(work, name), "finished_at_full": len(at), "survivors": sweep.survivors()}
    (work.parent / "filler").unlink()
    row |= resume_and_count(work, env, space, name, threshold, at, tune_at, logs=logs)
    print(markdown(
        ["disk full at", "exit (s after)", "stderr lines", "last line names the path", "state files broken",
         "resume exit", "completed lost", "duplicate runs", "RUNNING left (MLflow / Optuna)", "steps twice",
         "`results` = MLflow", "Tune board = MLflow"],
        [[f"{row['full_at_s']} s ({seen.evaluations} evaluations, {len(at)} finished)",
          f"{code} ({row['exit_s_after_full']} s)", row["stderr_lines"], row["names_the_path"],
          len(row["broken_state"]), row["resume_exit"], row["completed_lost"], row["duplicate_runs"],
          f"{row['running_mlflow']} / {row['running_optuna']}", row["steps_twice"], row["results_match"],
          row["tune_board_match"]]]))
    _notes(row, ["stderr_tail", "broken_state", "survivors", "completed_lost_why", "resume_stderr_tail"])
    return row


# -------------------------------------------------------------------------------------------------- Ctrl-C
def interrupted_trials_done(work: Path, name: str, running: dict[str, str], evals: int) -> dict[str, str]:
    """For each trial running at the interrupt (trial id -> its run id then): 'ok' when the same MLflow run ended
    FINISHED with all `evals` evaluations, each step once; else what is wrong."""
    client = mlflow_client(work)
    runs = {r.data.tags["cleansweep.trial_id"]: r for r in sweep_runs(client, name) if is_trial(r) and not is_lost(r)}
    out = {}
    for tid, run_id in running.items():
        run = runs.get(tid)
        if run is None:
            out[tid] = "no run (re-suggested under another id)"
            continue
        steps = [s for s, _, _ in run_history(client, run).get("zeroshot_top1", [])]
        wrong = [f"status {run.info.status}" if run.info.status != "FINISHED" else "",
                 "another run" if run.info.run_id != run_id else "",
                 f"{len(set(steps))} of {evals} evaluations" if len(set(steps)) != evals else "",
                 "steps twice" if len(steps) != len(set(steps)) else ""]
        out[tid] = ", ".join(w for w in wrong if w) or "ok"
    return out


def run_ctrlc(root: Path, env: dict[str, str], *, trials: int, epochs: int, clean_rows: int) -> dict[str, Any]:
    """Ctrl-C (SIGINT to the sweep's process group, as a terminal sends it) while a trial is half done, then
    `--resume`: exit 130 with one line, nothing left running, the interrupted trials finished in their own runs."""
    space, threshold, evals = fault_space(root, "ctrlc", trials=trials, epochs=epochs, clean_rows=clean_rows)
    work, name = fresh(root, "ctrlc"), "ctrlc"
    sweep = Sweep(work, env, space, name)
    seen = sweep.wait_event(mid_trial(evals))
    if seen is None:
        return {"error": f"the sweep ended (exit {sweep.proc.returncode}) before a trial was half done"}
    at, tune_at = finished_trials(work, name), tune_lines(work / "sweeps" / name)
    running = {tid: run.info.run_id for tid, run in _running_runs(work, name).items()}
    mark = sweep.err.stat().st_size
    t_int = time.monotonic()
    os.killpg(sweep.proc.pid, signal.SIGINT)
    code = sweep.end(timeout=180)
    row = {"interrupted_at_s": round(t_int - sweep.t0, 1), "exit": code, "exit_s": round(time.monotonic() - t_int, 1),
           "stderr_after_interrupt": sweep.stderr_lines(mark), "survivors": sweep.survivors(),
           "running_at_interrupt": len(running), "finished_at_interrupt": len(at),
           "evaluations_at_interrupt": seen.evaluations}
    row |= resume_and_count(work, env, space, name, threshold, at, tune_at)
    row["interrupted_trials"] = interrupted_trials_done(work, name, running, evals)
    print(markdown(
        ["interrupted at", "exit (s to exit)", "stderr lines after Ctrl-C", "left running", "resume exit",
         "interrupted trials finished in their own run", "completed lost", "duplicate runs",
         "RUNNING left (MLflow / Optuna)", "steps twice", "`results` = MLflow", "Tune board = MLflow"],
        [[f"{row['interrupted_at_s']} s ({seen.evaluations} evaluations, {len(at)} finished)",
          f"{code} ({row['exit_s']} s)", len(row["stderr_after_interrupt"]), len(row["survivors"]),
          row["resume_exit"], f"{sum(v == 'ok' for v in row['interrupted_trials'].values())} of {len(running)}",
          row["completed_lost"], row["duplicate_runs"], f"{row['running_mlflow']} / {row['running_optuna']}",
          row["steps_twice"], row["results_match"], row["tune_board_match"]]]))
    _notes(row, ["stderr_after_interrupt", "survivors", "interrupted_trials", "completed_lost_why"])
    return row


def _running_runs(work: Path, name: str) -> dict[str, Any]:
    return {r.data.tags["cleansweep.trial_id"]: r for r in sweep_runs(mlflow_client(work), name)
            if is_trial(r) and not is_lost(r) and r.info.status == "RUNNING"}


def _notes(row: dict[str, Any], keys: list[str]) -> None:
    for key in keys:
        if row.get(key):
            print(f"- {key.replace('_', ' ')}: {json.dumps(row[key], default=str)[:600]}")


# -------------------------------------------------------------------------------------------------- worker
def trial_workers(driver: int, work: Path, name: str) -> dict[int, str]:
    """pid -> trial id of the live trial processes (Ray actors `ray::ImplicitFunc`, which Ray starts in their own
    process groups), matched through the `pid` Tune records in every result."""
    pids = {}
    for d in (work / "sweeps" / name / "main").glob("*/result.json"):
        lines = d.read_text().splitlines()
        if lines:
            pids[int(json.loads(lines[-1])["pid"])] = d.parent.name
    live = {}
    for p in psutil.Process(driver).children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(p.cmdline()) and p.pid in pids:
                live[p.pid] = pids[p.pid]
        except psutil.NoSuchProcess:
            pass
    return live


def run_worker(root: Path, env: dict[str, str], *, trials: int, epochs: int, clean_rows: int) -> dict[str, Any]:
    """SIGKILL one trial's worker process while it is half done; the sweep goes on. Expected: that trial FAILED in
    MLflow with an error tag and FAIL in Optuna, never feasible; the others complete; the sweep exits 0."""
    space, threshold, evals = fault_space(root, "worker", trials=trials, epochs=epochs, clean_rows=clean_rows)
    work, name = fresh(root, "worker"), "worker"
    sweep = Sweep(work, env, space, name)
    deadline, victims = time.monotonic() + 600, {}
    while not victims and time.monotonic() < deadline and sweep.proc.poll() is None:
        seen = sweep.wait_event(mid_trial(evals))
        victims = trial_workers(sweep.proc.pid, work, name) if seen else {}
        time.sleep(0 if victims else 0.5)
    if not victims:
        sweep.end(timeout=1)
        return {"error": "no live trial worker found (the sweep ended or Tune recorded no pid)"}
    pid, victim = next(iter(victims.items()))
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    code = sweep.end()
    client = mlflow_client(work)
    runs = {r.data.tags["cleansweep.trial_id"]: r for r in sweep_runs(client, name) if is_trial(r) and not is_lost(r)}
    killed = runs.get(victim)
    board = _results_json(work, name, env)
    row = {"killed_trial": victim, "killed_at_s": round(t_kill - sweep.t0, 1), "exit": code,
           "sweep_s_after_kill": round(time.monotonic() - t_kill, 1), "stderr_lines": len(sweep.stderr_lines()),
           "killed_status": killed.info.status if killed else "no run",
           "killed_error_tag": (killed.data.tags.get("cleansweep.error", "")[:120] if killed else ""),
           "killed_optuna": _optuna_state(work, name, victim),
           "killed_feasible_in_results": next((r["feasible"] for r in board.get("top", [])
                                               if str(r["trial_id"]) == victim), None),
           "killed_is_best": (board.get("best") or {}).get("trial_id") == victim,
           "statuses": dict(Counter(r.info.status for r in runs.values())), "survivors": sweep.survivors()}
    row |= after_resume(work, name, threshold, {}, {}, env)
    print(markdown(
        ["killed at", "sweep exit", "killed trial: MLflow / Optuna", "error tag", "feasible in `results`",
         "trials by status", "RUNNING left (MLflow / Optuna)", "duplicate runs", "steps twice",
         "`results` = MLflow", "Tune board = MLflow"],
        [[f"{row['killed_at_s']} s", code, f"{row['killed_status']} / {row['killed_optuna']}",
          row["killed_error_tag"] or "none", row["killed_feasible_in_results"], row["statuses"],
          f"{row['running_mlflow']} / {row['running_optuna']}", row["duplicate_runs"], row["steps_twice"],
          row["results_match"], row["tune_board_match"]]]))
    _notes(row, ["survivors"])
    return row


def _results_json(work: Path, name: str, env: dict[str, str]) -> dict[str, Any]:
    proc = run_cli(["results", name, "--workdir", str(work), "--format", "json", "--top-k", "10000"], env, work)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def _optuna_state(work: Path, name: str, trial_id: str) -> str:
    """The Optuna state of Tune trial `trial_id`, matched by its sampled lr (params.json in its trial folder): Ray's
    OptunaSearch keeps its Tune id -> Optuna trial map private."""
    params = json.loads((work / "sweeps" / name / "main" / trial_id / "params.json").read_text())
    lr = params.get("optim.lr")
    states = [t.state.name for t in optuna_trials(work / "sweeps" / name) if t.params.get("optim.lr") == lr]
    return "/".join(states) or "not in the study"
