"""Sweep overhead: how much of a sweep's wall time is NOT spent computing trials (Tune, Optuna, MLflow, checkpoints).

Side by side in one run, on the same tiny world and the same starting model:

1. the sweep: `search.search` (local Ray, constrained Optuna, sqlite MLflow run per trial, checkpoints for resume
   and the best feasible model) of many short trials, `--slots` at a time;
2. the throwaway script a researcher would otherwise write: the *same* work (the starting model evaluated once,
   then the trial configurations read back from the sweep), `session.fit` in a pool of `--slots` processes with
   as many threads each as a trial gets, no tracking, no checkpoints. Its wall time includes starting the
   processes and importing torch, as a script's does.

    overhead = 1 - plain wall / sweep wall

Also printed: the per-trial cost ((sweep - plain) x slots / trials) and the older in-sweep figure (slot time spent
outside the trial functions). One-time set-up is timed separately and not counted: Ray's boot (a cluster is up
once per session) and creating the MLflow sqlite database (once per workdir); `overhead_first_use` counts both.
Target <= 0.10 for 50+ short trials on 2 cores.

    python benchmarks/sweep_overhead.py [--trials 50] [--slots 2] [--epochs 1] [--clean-rows 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Heavy imports live in the functions: the plain pool's spawned workers re-import this module and must pay only
# what a throwaway script pays (torch, open_clip), not Ray or MLflow.


def tiny_model(root: Path, clean_rows: int) -> tuple[dict, Path]:
    """A tiny world and a poisoned tiny-rn checkpoint trained on it (session.fit, a few seconds)."""
    from cleansweep import session
    from cleansweep.data import make_demo_world
    from cleansweep.poison import poison_csv

    world = make_demo_world(root / "world", seed=0, n_train=64, n_clean=clean_rows, n_eval=36, image_size=32,
                            num_classes=6)
    manifest = poison_csv(world["train_csv"], root / "poisoned", attack="badnet", target="banana", fraction=0.3,
                          seed=0, image_size=32, patch_size=4)
    spec = {"model": {"name": "tiny-rn"}, "attack": {"patch_size": 4}, "epochs": 2, "device": "cpu",
            "data": {"train_csv": str(root / "poisoned" / manifest["output_csv"]), "eval_dir": world["eval_dir"],
                     "batch_size": 16, "eval_batch_size": 64}, "optim": {"lr": 3e-3, "warmup_steps": 2}}

    def keep(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, root / "model", dirs_exist_ok=True)

    session.fit(spec, keep)
    return world, root / "model" / "model.safetensors"


def space_file(root: Path, world: dict, checkpoint: Path, trials: int, slots: int, epochs: int) -> Path:
    path = root / "overhead.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: tiny-rn}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16, eval_batch_size: 64}}
        attack: {{patch_size: 4}}
        objective: {{threshold: 0.1}}
        epochs: {epochs}
        eval_every: 1
        base: {{optim.warmup_steps: 2, device: cpu}}
        space:
          optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}
        search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: {slots}}}
        scheduler: {{name: none}}
        resources: {{cpu: {2 / slots:g}}}
        """))
    return path


def trial_records(uri: str, name: str) -> list[tuple[float, dict[str, Any]]]:
    """Each trial's wall time inside its trial function (its MLflow run's start to end) and its sampled params."""
    from cleansweep import search, tracking

    sweep = tracking.load_sweep(name, uri)
    client = tracking.open_client(uri)
    out = []
    for run_id in sweep.trials["run_id"]:
        run = client.get_run(run_id)
        params = json.loads(run.data.tags[search.SAMPLED_TAG])
        out.append(((run.info.end_time - run.info.start_time) / 1000, params))
    return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _plain_trial(spec: dict[str, Any]) -> float:
    """One trial as a script runs it: train and evaluate, keep the metrics, write nothing."""
    from cleansweep import session

    seen: list[float] = []
    session.fit(spec, lambda metrics, checkpoint_dir: seen.append(metrics["zeroshot_top1"]), checkpoints="none")
    return seen[-1]


def plain_wall(specs: list[dict[str, Any]], slots: int, threads: int) -> float:
    """Wall time of the trials run by a process pool of `slots` workers (spawned: fresh imports, like a script)."""
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=slots, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
        list(pool.map(_plain_trial, specs))
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--slots", type=int, default=2, help="concurrent trials (CPUs are split evenly)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--clean-rows", type=int, default=32, help="cleaning pairs per trial epoch (batch 16)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    import ray

    from cleansweep import search, spaces, tracking

    root = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    root.mkdir(parents=True, exist_ok=True)
    world, checkpoint = tiny_model(root, args.clean_rows)
    cfg = spaces.load(space_file(root, world, checkpoint, args.trials, args.slots, args.epochs))

    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray_boot = time.monotonic() - t0
    t0 = time.monotonic()
    tracking.open_client(tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, root / "work"))
    db_init = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        out = search.search(cfg, name=f"overhead-{int(time.time())}", workdir=root / "work", echo=lambda s: None)
        sweep = time.monotonic() - t0
    finally:
        ray.shutdown()
    records = trial_records(out["tracking_uri"], out["name"])

    start = search.resolve_start_model(cfg, root / "work", echo=lambda s: None)
    base = spaces.base_train_dict(cfg, data=start["data"], init=start["init"], model_name=start["model_name"],
                                  defaults=start["defaults"])
    # The same work as the sweep: the starting model evaluated once, then every trial as the sweep runs it.
    specs = [search.start_eval_spec(base).model_dump(mode="json")]
    for _, params in records:
        spec = spaces.trial_spec(base, params)
        spec = spec.model_copy(update={"eval_at_start": spec.eval_at_start and search.changes_start_weights(spec)})
        specs.append(spec.model_dump(mode="json"))
    plain = plain_wall(specs, args.slots, max(1, 2 // args.slots))

    inside = sum(seconds for seconds, _ in records)
    print(json.dumps({
        "trials": len(records), "slots": args.slots, "epochs": args.epochs, "steps_per_epoch": args.clean_rows // 16,
        "sweep_wall_s": round(sweep, 1), "plain_wall_s": round(plain, 1), "ray_boot_s": round(ray_boot, 1),
        "mlflow_db_init_s": round(db_init, 1), "overhead_fraction": round(1 - plain / sweep, 3),
        "overhead_first_use": round(1 - plain / (sweep + ray_boot + db_init), 3),
        "per_trial_overhead_s": round((sweep - plain) * args.slots / len(records), 3),
        "mean_trial_s_in_sweep": round(inside / len(records), 2),
        "outside_trial_functions_fraction": round(1 - inside / (args.slots * sweep), 3),
        "target": 0.10}, indent=2))


if __name__ == "__main__":
    main()
