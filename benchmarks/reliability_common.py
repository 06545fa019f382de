"""Shared parts of the reliability benchmark: the `cleansweep` subprocess, Markdown, file digests, the tiny
backdoored model every sweep cleans, and reads of a sweep's MLflow store (see reliability.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOP1, ASR = "zeroshot_top1", "asr_top1"
CLI = [sys.executable, "-m", "cleansweep"]
PATCH = 8  # a fixed 8 px BadNet patch in a fixed corner: the tiny model takes it in a few epochs (tests/test_search)
POLL_S = 0.25  # how often the kill part looks at the store while waiting for its event


# ------------------------------------------------------------------------------------------------ shared
def bench_env(root: Path) -> dict[str, str]:
    """The environment of every `cleansweep` subprocess: a private HOME (Ray writes its auth token to ~/.ray), no
    inherited cluster address or tracking URI, unbuffered output (the kill part reads the driver's lines)."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    drop = {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "CLEANSWEEP_WORKDIR", "TUNE_GLOBAL_CHECKPOINT_S"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", RAY_DISABLE_IMPORT_WARNING="1")
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`cleansweep ARGS` in a subprocess; stdout and stderr captured as text."""
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@dataclass
class Ran:
    """A finished `cleansweep` command: exit code (None when it was killed at its time limit), output, wall time."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_guarded(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Ran:
    """`cleansweep ARGS` in its own session; past `timeout` its whole process group is killed (a command that
    wrongly accepts its input may start Ray or an MLflow server, which would outlive a plain kill)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_family(proc.pid)
        out, err = proc.communicate()
        code = None
    return Ran(code, out, err, time.monotonic() - t0)


def kill_family(pid: int) -> None:
    """SIGKILL process `pid`, its process group and every descendant (Ray's trial workers start their own groups)."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (cells with '|' escaped, newlines flattened)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tree_digest(roots: list[Path]) -> dict[str, str]:
    """sha256 of every file under `roots` (relative path -> digest); a folder's absence is recorded too."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(path)] = digest.hexdigest()
    return out


def digest_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files changed, removed or added between two `tree_digest`s, as short labels."""
    changed = [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    removed = [f"removed {p}" for p in before if p not in after]
    added = [f"added {p}" for p in after if p not in before]
    return changed + removed + added


def write_space(path: Path, world: dict, checkpoint: Path, extra: str) -> Path:
    """A search-space YAML on the tiny world (the shape of tests/test_search.py's `_space_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: tiny-rn}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16,
                eval_batch_size: 64}}
        attack: {{name: badnet, patch_size: {PATCH}, location: fixed, patch: fixed}}
        """) + textwrap.dedent(extra))
    return path


def poisoned_model(root: Path, clean_rows: int) -> dict[str, Any]:
    """A tiny world and a backdoored tiny-rn trained on it, as tests/test_search.py's `tiny_checkpoint` (512 pairs,
    20% fixed 8 px BadNet, 6 epochs, the evaluation with the highest ASR kept); cached in root/tiny-<clean_rows>."""
    out = root / f"tiny-{clean_rows}"
    record = out / "model-record.json"
    if record.is_file():
        return json.loads(record.read_text())
    from cleansweep import fit as session
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    world = make_demo_world(out / "world", seed=0, n_train=512, n_clean=clean_rows, n_eval=36, image_size=32,
                            num_classes=6)
    manifest = poison_csv(world["train_csv"], out / "poisoned", attack="badnet", target="banana", fraction=0.2,
                          seed=0, image_size=32, patch_size=PATCH, location="fixed", patch="fixed")
    spec = {"model": {"name": "tiny-rn"}, "epochs": 6, "device": "cpu", "seed": 0,
            "attack": {"patch_size": PATCH, "location": "fixed", "patch": "fixed"},
            "data": {"train_csv": str(out / "poisoned" / manifest["output_csv"]), "eval_dir": world["eval_dir"],
                     "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    kept: dict[str, float] = {}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None and metrics[ASR] > kept.get(ASR, -1.0):
            shutil.copytree(checkpoint_dir, out / "model", dirs_exist_ok=True)
            kept.update({TOP1: float(metrics[TOP1]), ASR: float(metrics[ASR])})

    session.fit(spec, report)
    info = {"world": {k: str(world[k]) for k in ("clean_csv", "eval_dir", "train_csv")},
            "checkpoint": str(out / "model" / "model.safetensors"), "metrics": kept}
    record.write_text(json.dumps(info, indent=2))
    return info


def threshold_for(model: dict[str, Any]) -> float:
    """Below the starting model's ASR, so the start is infeasible and cleaning has to lower the ASR."""
    start = float(model["metrics"][ASR])
    if start < 0.3:
        raise SystemExit(f"the tiny model did not take the backdoor (ASR {start}); recalibrate its pre-training")
    return round(0.6 * start, 3)


# ------------------------------------------------------------------------------------------------ MLflow reads
def mlflow_client(workdir: Path, uri: str | None = None) -> Any | None:
    """A client on the sweep's store (`uri`, else the sqlite file in `workdir`), or None while the driver has not
    created the sqlite file yet."""
    from cleansweep import tracking

    if uri is None and not (workdir / "mlflow.db").is_file():
        return None
    return tracking.open_client(uri or tracking.resolve_tracking_uri(None, workdir, env={}))


def sweep_runs(client: Any, name: str) -> list[Any]:
    """Every MLflow run of sweep `name` (its parent and all trial runs, lost ones included)."""
    exp = client.get_experiment_by_name("cleansweep")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`cleansweep.sweep` = '{name}'",
                              max_results=10_000)


def is_trial(run: Any) -> bool:
    return run.data.tags.get("cleansweep.kind") == "trial"


def is_lost(run: Any) -> bool:
    # Tagged by the driver on resume: a trial created after Tune's last snapshot, re-suggested under another id.
    return "cleansweep.lost" in run.data.tags


def run_history(client: Any, run: Any) -> dict[str, list[tuple[int, int, float]]]:
    """Metric key -> every logged point (step, timestamp, value), duplicates kept."""
    return {key: [(int(m.step), int(m.timestamp), float(m.value)) for m in client.get_metric_history(run.info.run_id,
                                                                                                     key)]
            for key in run.data.metrics}


def evaluations(history: dict[str, list[tuple[int, int, float]]]) -> dict[int, tuple[float, float]]:
    """step -> (top1, asr), the newest value per step (what a reader of the store sees)."""
    latest: dict[str, dict[int, tuple[int, float]]] = {}
    for key in (TOP1, ASR):
        for step, ts, value in history.get(key, []):
            if step not in latest.setdefault(key, {}) or ts >= latest[key][step][0]:
                latest[key][step] = (ts, value)
    steps = set(latest.get(TOP1, {})) & set(latest.get(ASR, {}))
    return {s: (latest[TOP1][s][1], latest[ASR][s][1]) for s in sorted(steps)}


def repeated_steps(history: dict[str, list[tuple[int, int, float]]]) -> int:
    """Points logged again at a step that key already had (0 when every step of every key is logged once)."""
    return sum(len(points) - len({step for step, _, _ in points}) for points in history.values())


