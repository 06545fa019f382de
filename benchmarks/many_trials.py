"""Hundreds of trials: does anything grow over a long sweep logging to `mlflow server` on PostgreSQL?

One sweep of many short trials (a tiny-rn model of the demo world's size, 2 epochs on a small clean CSV, Optuna +
ASHA with a 1-epoch grace period, `--slots` at a time) through the real CLI, `cleansweep search`, in a subprocess,
logging to a real `mlflow server --backend-store-uri postgresql://...` (tests/pg_server.py starts the database).
Measured:

- the driver's RSS over time (psutil, every `--sample-s` seconds): start, middle, end and peak; and the largest RSS
  of its trial workers (Tune reuses one actor per slot across trials);
- Optuna's time per `suggest` (and per `on_trial_complete`, which tells the study) against the trial number: the
  driver subprocess wraps `ConstrainedOptunaSearch`'s two methods with a timer that appends to a log (this module's
  `driver` mode; the package itself is not changed and the wrapped methods run exactly as before);
- per-trial overhead: the median wall of the first 20 and the last 20 trials (their MLflow runs' start to end, split
  by how many epochs ASHA let them run) and the median interval between consecutive trial starts (everything the
  driver does per trial: Optuna, Tune, MLflow, the trial's process start);
- MLflow child runs vs Tune trials, and lost metrics: every evaluation in each trial's Tune result.json must be one
  point of the trial's MLflow `zeroshot_top1` history;
- the wall time of `cleansweep results`, `cleansweep report` (subprocesses, Python's start-up included; a bare
  `python -c "import cleansweep.cli"` is timed for reference) and of the MLflow UI's run list: the REST call its
  experiment page makes (MLflow 3.17's UI: `POST ajax-api/2.0/mlflow/runs/search`, experiment_ids, order_by
  `attributes.start_time DESC`, run_view_type ACTIVE_ONLY, max_results 100), first page and all pages.

    python benchmarks/many_trials.py [--trials 300] [--slots 2] [--clean-rows 64] [--workdir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOP1 = "zeroshot_top1"
EDGE = 20  # trials compared at each end of the sweep
UI_PAGE = 100  # the MLflow UI's runs page size (RUNS_SEARCH_MAX_RESULTS in its JavaScript)


# ------------------------------------------------------------------------------------------------ driver mode
def _timed(method, kind: str, log_path: str):
    """`method` wrapped to append `{"kind", "t", "s", "none"}` to `log_path` per call; same arguments and result."""

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = method(self, *args, **kwargs)
        seconds = time.perf_counter() - t0
        with open(log_path, "a") as log:
            log.write(json.dumps({"kind": kind, "t": time.time(), "s": seconds, "none": out is None}) + "\n")
        return out

    return wrapper


def driver_main(log_path: str, argv: list[str]) -> int:
    """`cleansweep` with ConstrainedOptunaSearch's suggest and on_trial_complete timed into `log_path`."""
    try:
        from cleansweep.sweep.optuna import ConstrainedOptunaSearch
    except ImportError:  # before the driver's split into sweep/{trial,optuna,...}
        from cleansweep.sweep.driver import ConstrainedOptunaSearch
    from cleansweep import cli

    for name in ("suggest", "on_trial_complete"):
        setattr(ConstrainedOptunaSearch, name, _timed(getattr(ConstrainedOptunaSearch, name), name, log_path))
    return cli.main(argv)


# ------------------------------------------------------------------------------------------------ services
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(root: Path, backend_uri: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on `backend_uri`, artifacts proxied to root/artifacts; returns it and its URL once healthy."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(root / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mlflow server did not start: " + (root / "mlflow-server.log").read_text()[-2000:])
        time.sleep(0.5)


def space_file(root: Path, world: dict, checkpoint: Path, url: str, experiment: str, trials: int, slots: int) -> Path:
    path = root / "many.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: tiny-rn}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16, eval_batch_size: 64}}
        attack: {{patch_size: 4}}
        mlflow: {{tracking_uri: "{url}", experiment: {experiment}}}
        objective: {{threshold: 0.1}}
        epochs: 2
        eval_every: 1
        base: {{optim.warmup_steps: 2, device: cpu}}
        space:
          optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}
        search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: {slots}}}
        scheduler: {{name: asha, time_attr: epoch, grace_period: 1, reduction_factor: 3}}
        resources: {{cpu: {2 / slots:g}}}
        """))
    return path


# ------------------------------------------------------------------------------------------------ the sweep
def run_sweep(argv: list[str], timing_log: Path, env: dict, log: Path, sample_s: float) -> tuple[int, list, float]:
    """The driver subprocess to its end: exit code, [(seconds since start, RSS MB, [trial workers' RSS MB])]
    samples, wall seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "driver", str(timing_log), *argv]
    samples: list[tuple[float, float, list[float]]] = []
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        me = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                samples.append((round(time.monotonic() - t0, 1), me.memory_info().rss / 2**20, _workers_mb(me)))
            except psutil.Error:
                pass
            time.sleep(sample_s)
    return proc.returncode, samples, time.monotonic() - t0


def _workers_mb(driver: psutil.Process) -> list[float]:
    """RSS (MB) of each trial worker process (Ray's `ray::ImplicitFunc...`, reused by Tune across trials)."""
    out = []
    for child in driver.children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(child.cmdline()):
                out.append(round(child.memory_info().rss / 2**20))
        except psutil.Error:
            pass
    return out


def tune_evaluations(sweep_dir: Path) -> dict[str, int]:
    """Tune trial id -> how many evaluations (results carrying zeroshot_top1) its result.json holds."""
    out = {}
    for path in sweep_dir.rglob("result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = sum(TOP1 in row for row in rows)
    return out


def mlflow_trials(url: str, experiment: str) -> list[dict]:
    """Each child run of the experiment: trial id, status, start, wall seconds, points in its zeroshot_top1 history."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    out = []
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        end = run.info.end_time or run.info.start_time
        out.append({"trial_id": run.data.tags.get("cleansweep.trial_id"), "status": run.info.status,
                    "start": run.info.start_time / 1000, "wall_s": (end - run.info.start_time) / 1000,
                    "points": len(client.get_metric_history(run.info.run_id, TOP1))})
    return sorted(out, key=lambda r: r["start"])


def ui_run_list(url: str, experiment: str) -> dict:
    """Seconds of the UI's run-list call: its first page, and every page (as scrolling to the end loads)."""
    from mlflow import MlflowClient

    exp_id = MlflowClient(tracking_uri=url).get_experiment_by_name(experiment).experiment_id

    def page(token: str | None) -> dict:
        body = {"experiment_ids": [exp_id], "order_by": ["attributes.start_time DESC"],
                "run_view_type": "ACTIVE_ONLY", "max_results": UI_PAGE, **({"page_token": token} if token else {})}
        req = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/runs/search", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    firsts = []
    for _ in range(3):
        t0 = time.perf_counter()
        first = page(None)
        firsts.append(time.perf_counter() - t0)
    t0, got, token = time.perf_counter(), len(first.get("runs", [])), first.get("next_page_token")
    while token:
        more = page(token)
        got, token = got + len(more.get("runs", [])), more.get("next_page_token")
    return {"ui_first_page_s": round(statistics.median(firsts), 3),
            "ui_all_pages_s": round(firsts[-1] + time.perf_counter() - t0, 3), "ui_runs_listed": got}


def timed_cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cleansweep", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"cleansweep {args[0]} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return round(time.perf_counter() - t0, 2)


# ------------------------------------------------------------------------------------------------ summary
def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def ends(values: list[float]) -> dict:
    return {"first": _median(values[:EDGE]), "last": _median(values[-EDGE:])}


def overhead_summary(trials: list[dict], tune: dict[str, int]) -> dict:
    """Per-trial wall and start interval at both ends, and the counts of runs, trials and lost metrics."""
    starts = [t["start"] for t in trials]
    by_points = {}
    for n in sorted({t["points"] for t in trials}):
        by_points[f"wall_s_{n}_evals"] = ends([t["wall_s"] for t in trials if t["points"] == n])
    lost = {tid: n - next((t["points"] for t in trials if t["trial_id"] == tid), 0)
            for tid, n in tune.items()}
    return {"tune_trials": len(tune), "mlflow_child_runs": len(trials),
            "statuses": {s: sum(t["status"] == s for t in trials) for s in sorted({t["status"] for t in trials})},
            "lost_metrics": sum(max(0, v) for v in lost.values()),
            "extra_metrics": sum(max(0, -v) for v in lost.values()),
            "tune_evaluations": sum(tune.values()), "wall_s_all": ends([t["wall_s"] for t in trials]), **by_points,
            "start_interval_s": ends([b - a for a, b in zip(starts, starts[1:], strict=False)])}


def optuna_summary(timing_log: Path) -> dict:
    calls = [json.loads(line) for line in timing_log.read_text().splitlines()] if timing_log.exists() else []
    suggests = [c["s"] * 1000 for c in calls if c["kind"] == "suggest" and not c["none"]]
    tells = [c["s"] * 1000 for c in calls if c["kind"] == "on_trial_complete"]
    return {"suggest_ms": ends(suggests), "suggest_ms_max": round(max(suggests, default=0), 1),
            "suggests": len(suggests), "tell_ms": ends(tells)}


def rss_summary(samples: list[tuple[float, float, list[float]]]) -> dict:
    if not samples:
        return {}
    workers = [(s[0], max(s[2])) for s in samples if s[2]]
    worker_fields = {} if not workers else {
        "worker_rss_mb_start": workers[len(workers) // 10][1], "worker_rss_mb_middle": workers[len(workers) // 2][1],
        "worker_rss_mb_end": workers[-1][1], "worker_rss_mb_peak": max(w for _, w in workers)}
    mid = samples[len(samples) // 2]
    # The first samples are the interpreter starting; "start" is once Ray and the trials run (after 10% of the run).
    start = samples[len(samples) // 10]
    return {"rss_mb_start": round(start[1]), "rss_mb_middle": round(mid[1]), "rss_mb_end": round(samples[-1][1]),
            "rss_mb_peak": round(max(s[1] for s in samples)), **worker_fields,
            "rss_at_s": [start[0], mid[0], samples[-1][0]]}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--clean-rows", type=int, default=64, help="cleaning pairs per trial epoch (batch 16)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    ap.add_argument("--keep-services", action="store_true",
                    help="leave PostgreSQL and the MLflow server running at the end (to time readers again)")
    args = ap.parse_args()
    sys.path[:0] = [str(HERE), str(REPO / "tests")]
    from pg_server import start as start_postgres
    from pg_server import stop as stop_postgres
    from sweep_overhead import tiny_model

    root = args.workdir or Path(tempfile.mkdtemp(prefix="many-trials-"))
    root.mkdir(parents=True, exist_ok=True)
    world, checkpoint = tiny_model(root, args.clean_rows)
    pg_root = Path(tempfile.mkdtemp(prefix="many-trials-pg-"))  # handed to the postgres user when we are root
    server = None
    try:
        server, url = start_mlflow(root, start_postgres(pg_root).uri)
        name, experiment = f"many-{int(time.time())}", "many-trials"
        space = space_file(root, world, checkpoint, url, experiment, args.trials, args.slots)
        (root / "home").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        env.update(HOME=str(root / "home"), PYTHONPATH=str(REPO))
        workdir = root / "work"
        print(f"sweep {name} logging to {url}, workdir {workdir}", flush=True)
        code, samples, wall = run_sweep(["search", str(space), "--name", name, "--workdir", str(workdir)],
                                        root / "optuna-timing.jsonl", env, root / "search.log", args.sample_s)
        (root / "rss-samples.json").write_text(json.dumps(samples))
        if code != 0:
            raise SystemExit(f"cleansweep search exited {code}: " + (root / "search.log").read_text()[-3000:])
        trials = mlflow_trials(url, experiment)
        summary = {"tracking_uri": url, "name": name, "workdir": str(workdir), "trials": args.trials,
                   "slots": args.slots, "sweep_wall_s": round(wall),
                   **overhead_summary(trials, tune_evaluations(workdir / "sweeps" / name)),
                   **optuna_summary(root / "optuna-timing.jsonl"), **rss_summary(samples)}
        base = ["--tracking-uri", url, "--workdir", str(workdir)]
        summary["python_import_cli_s"] = round(_import_cli_s(env), 2)
        summary["results_s"] = timed_cli(["results", name, "--format", "json", *base], env)
        summary["report_s"] = timed_cli(["report", name, "--out", str(root / "report"), *base], env)
        summary.update(ui_run_list(url, experiment))
        summary["rss_samples"] = samples
    finally:
        if args.keep_services:
            print(f"kept: mlflow server pid {server and server.pid}, PostgreSQL in {pg_root}", flush=True)
        elif server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        if not args.keep_services:
            stop_postgres(pg_root)
    text = json.dumps(summary)
    if args.out:
        args.out.write_text(text)
    shown = {k: v for k, v in summary.items() if k != "rss_samples"}
    print(json.dumps(shown, indent=2))


def _import_cli_s(env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cleansweep.cli"], env=env, cwd=REPO, check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "driver":
        sys.exit(driver_main(sys.argv[2], sys.argv[3:]))
    main()
