"""Poisoned pre-training on Ray Train: one driver (`pretrain`) and one worker function (`train_worker`).

The driver checks everything that can be checked before a cluster is touched (inputs, run folder, resources), opens
the MLflow run, launches `TorchTrainer(train_worker)` and finally exports the selected evaluation's model. The worker
calls `session.fit` (the only wiring of a training run) with a report adapter: rank 0 logs each evaluation to MLflow
(one batch, never a step twice) and keeps the selection candidate; every rank calls `ray.train.report`.

Layout of `<workdir>/pretrain/NAME/` (also Ray's `storage_path/name`): see `layout.py`. The last
`keep_checkpoints` resumable checkpoints (Ray's, or ours with num_workers=0); `candidate/` holds the best evaluation
so far under `selection` (written by rank 0 eagerly, so Ray pruning old checkpoints never loses the selected one);
`selected/` is written once training ends and is what cleaning consumes.

Progress: rank 0 prints a line every ~10 s of training and at every evaluation (epoch, step, loss, the last
top-1/ASR, throughput, ETA), so a long pre-training is never silent.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cleansweep import tracking
from cleansweep.errors import UserError
from cleansweep.runtime import atomic, cluster, layout, scratch
from cleansweep.train_config import PretrainConfig, TrainSpec

CHECKPOINT_PREFIX = layout.CHECKPOINT_PREFIX
WEIGHTS, RUN_FILE, DONE_FILE = layout.MODEL_FILE, layout.PRETRAIN_RUN_FILE, layout.PRETRAIN_DONE_FILE


# ------------------------------------------------------------------------------------------------ selection
class Selector:
    """Which evaluation's model goes to cleaning (the paper's rules), decided one evaluation at a time.

    `best_top1`: highest zeroshot_top1 (earliest on ties). `closest_top1`: accuracy closest to `reference_top1`
    (how the paper matches its MMCL and MMCL+SSL models). `last`: the final evaluation.
    """

    def __init__(self, rule: str, reference_top1: float | None = None, current: Mapping[str, float] | None = None):
        if rule == "closest_top1" and reference_top1 is None:
            raise UserError("selection 'closest_top1' needs reference_top1; pass --reference-top1 (e.g. 0.2376)")
        self.rule = rule
        self.reference = reference_top1
        self.current = dict(current) if current else None

    def _score(self, metrics: Mapping[str, float]) -> float:
        top1 = float(metrics["zeroshot_top1"])
        if self.rule == "best_top1":
            return top1
        if self.rule == "closest_top1":
            return -abs(top1 - self.reference)
        return float(metrics["step"])  # last

    def consider(self, metrics: Mapping[str, float]) -> bool:
        """Take `metrics` as the new selection if it beats the current one; return whether it did."""
        if "zeroshot_top1" not in metrics or not math.isfinite(float(metrics["zeroshot_top1"])):
            return False
        if self.current is not None and self._score(metrics) <= self._score(self.current):
            return False
        self.current = dict(metrics)
        return True


# ------------------------------------------------------------------------------------------------ worker
def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker (also run in-process when num_workers=0): resume if a checkpoint exists, then fit."""
    from cleansweep import fit as session

    spec = TrainSpec.model_validate(config["spec"])
    run_dir = Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    nodes = _worker_nodes(config["local"])
    handle = None
    if rank == 0:
        handle = tracking.RunHandle.reopen(config["tracking_uri"], config["run_id"])
        handle.set_tags(tracking.pretrain_tags(worker_nodes=",".join(nodes), num_nodes=len(set(nodes))))
    selector = Selector(config["selection"], config["reference_top1"], _read_candidate(run_dir))
    progress = ProgressLine(config["name"]) if rank == 0 else None
    reporter = _Reporter(rank=rank, local=config["local"], run_dir=run_dir, keep=config["keep"], run=handle,
                         selector=selector, progress=progress)
    with scratch.folder(config["scratch"], f"rank{rank}") as in_flight:
        if config["local"]:
            latest = latest_local_checkpoint(run_dir)
            summary = session.fit(spec, reporter, resume_from=str(latest) if latest else None, scratch_dir=in_flight,
                                  progress=progress)
        elif (checkpoint := ray.train.get_checkpoint()) is None:
            summary = session.fit(spec, reporter, resume_from=None, scratch_dir=in_flight, progress=progress)
        else:
            with checkpoint.as_directory() as resume_dir:
                summary = session.fit(spec, reporter, resume_from=resume_dir, scratch_dir=in_flight,
                                      progress=progress)
    if rank == 0:
        # The driver's proof that training ran to its end (an aborted Ray run also returns from fit()).
        atomic.write_json(run_dir / DONE_FILE, {"step": summary["step"],
                                                "last": flat_metrics(summary.get("last", {}))})


class _Reporter:
    """The `report(metrics, checkpoint_dir)` adapter handed to `session.fit`."""

    def __init__(self, *, rank: int, local: bool, run_dir: Path, keep: int, run: tracking.RunHandle | None,
                 selector: Selector, progress: ProgressLine | None = None):
        self.rank, self.local, self.run_dir, self.keep = rank, local, run_dir, keep
        self.run, self.selector, self.progress = run, selector, progress

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        params = metrics.get("params")
        flat = flat_metrics(metrics)
        step = int(flat["step"])
        if self.progress is not None:
            self.progress.last_eval = flat
        # MLflow before the checkpoint: a kill in between repeats this step on resume, and the repeat is skipped.
        if self.run is not None:
            if params:
                self.run.log_params(params, on_conflict="rename")
            self.run.log_metrics(flat, step)
            if checkpoint_dir and self.selector.consider(flat):
                _write_candidate(Path(checkpoint_dir), self.run_dir / layout.CANDIDATE, flat)
        name = layout.checkpoint_name(step)
        if self.local:
            if checkpoint_dir:
                _keep_local_checkpoint(Path(checkpoint_dir), self.run_dir / name, self.keep)
            ray.train.report(flat)
            return
        # Every rank reports (a barrier); rank 0's files are the checkpoint (all ranks hold the same weights).
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if self.rank == 0 and checkpoint_dir else None
        ray.train.report(flat, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


class ProgressLine:
    """`loop.run`'s progress callback on rank 0: one line with where training is and when it will end."""

    def __init__(self, name: str, echo: Callable[[str], None] | None = None):
        self.name = name
        self.echo = echo or (lambda line: print(line, flush=True))
        self.last_eval: dict[str, float] = {}

    def __call__(self, info: Mapping[str, Any]) -> None:
        self.echo(self.render(info))

    def render(self, info: Mapping[str, Any]) -> str:
        """`[pretrain NAME] epoch 2.31/6 step 72/186 loss 3.412 | last eval top1 0.812 asr 0.930 | 8.2 steps/s,
        ETA 0:00:14` (the ETA from the steps this process did so far)."""
        step, total = int(info["step"]), int(info["total_steps"])
        epochs = info.get("epochs", 0.0)
        done = step - int(info.get("start_step", 0))
        rate = done / info["seconds"] if info["seconds"] > 0 else math.nan
        eta = (total - step) / rate if rate and math.isfinite(rate) and rate > 0 else math.nan
        ev = self.last_eval
        last = (f"last eval top1 {ev['zeroshot_top1']:.3f} asr {ev.get('asr_top1', math.nan):.3f} "
                f"(epoch {ev.get('epoch', 0):.2f})" if "zeroshot_top1" in ev else "no evaluation yet")
        when = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        loss = f"{info['loss']:.4f}" if math.isfinite(info["loss"]) else "-"
        return (f"[pretrain {self.name}] epoch {info['epoch']:.2f}/{epochs:g} step {step}/{total} "
                f"loss {loss} | {last} | {rate:.2f} steps/s, ETA {when}")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a reported metrics dict as floats (Ray and MLflow take flat numbers only)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, bool | int | float)}


def _worker_nodes(local: bool) -> list[str]:
    """Ray node id of every rank, gathered so rank 0 can record where the run ran."""
    if local:
        return ["local"]
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _write_candidate(checkpoint_dir: Path, dest: Path, metrics: Mapping[str, float]) -> None:
    weights = checkpoint_dir / WEIGHTS
    if not weights.is_file():
        raise RuntimeError(f"session checkpoint {checkpoint_dir} has no {WEIGHTS}; cannot keep the selected model")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(weights, tmp / WEIGHTS)
    atomic.write_json(tmp / layout.CANDIDATE_FILE, dict(metrics))
    atomic.replace_dir(tmp, dest)



def _candidate_dir(run_dir: Path) -> Path:
    # A crash inside atomic.replace_dir can leave only the previous candidate, under its `.old` name.
    current = run_dir / layout.CANDIDATE
    return current if current.is_dir() else atomic.previous_dir(current)


def _read_candidate(run_dir: Path) -> dict[str, float] | None:
    path = _candidate_dir(run_dir) / layout.CANDIDATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None



def _keep_local_checkpoint(checkpoint_dir: Path, dest: Path, keep: int) -> None:
    # num_workers=0 runs without Ray's storage, so keep the newest `keep` checkpoints ourselves.
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    atomic.replace_dir(tmp, dest)
    for old in sorted(dest.parent.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint_step_*` folder of a run (names sort by step)."""
    found = sorted(p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------ driver
run_dir_of = layout.pretrain_dir  # where run NAME keeps its checkpoints and selected model


def selected_card(workdir: Path, run_name: str) -> dict[str, Any] | None:
    """The card (`selected/model.json`) of a finished pre-training run, with its `checkpoint` path, or None."""
    card = layout.selected_checkpoint(workdir, run_name).with_suffix(".json")
    if not card.is_file():
        return None
    data = json.loads(card.read_text())
    return {**data, "checkpoint": str(card.with_name(layout.MODEL_FILE))}


def pretrain(cfg: PretrainConfig, *, workdir: Path, resume: bool = False) -> dict[str, Any]:
    """Pre-train a CLIP model on (poisoned) data with Ray Train and export the selected checkpoint.

    Args:
        cfg: Validated configuration; relative paths are taken relative to the current directory.
        workdir: Holds `pretrain/NAME/` and, by default, the MLflow database.
        resume: Continue run NAME from its last checkpoint (without it an existing NAME is an error).

    Returns:
        Summary: `selected` (path of model.safetensors), `zeroshot_top1`, `asr_top1`, `step`, `epoch`, `minutes`,
        `run_dir`, `mlflow_run_id`, `tracking_uri`.
    """
    started = time.monotonic()
    cfg = _absolute_paths(cfg)
    run_dir = run_dir_of(workdir, cfg.name)
    _check_run_folder(run_dir, cfg.name, resume)
    _check_inputs(cfg)
    # Cluster and resources first: a request that can never run leaves no run folder and no MLflow run behind.
    with _cluster(cfg):
        identity = _open_run_folder(run_dir, cfg, resume)
        uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, Path(workdir))
        client = tracking.open_client(uri)
        experiment_id = tracking.get_or_create_experiment(client, cfg.mlflow.experiment)
        run = tracking.start_run(client, experiment_id, key=f"pretrain/{cfg.name}/{identity['uid']}",
                                 run_name=cfg.name, tags=run_tags(cfg))
        try:
            run.log_params(_driver_params(cfg), on_conflict="rename")
            (run_dir / DONE_FILE).unlink(missing_ok=True)
            _train(cfg, run_dir, _loop_config(cfg, run_dir, uri, run.run_id))
            if not (run_dir / DONE_FILE).is_file():
                raise KeyboardInterrupt  # Ray aborted the run (Ctrl-C): what was reported is kept, resume later
            scratch.remove(scratch.name(run_dir))  # what killed workers on this node left (other nodes: at resume)
            summary = _export_selected(cfg, run_dir, run)
        except BaseException as e:
            run.end(tracking.exit_status(e))
            raise
        run.end("FINISHED")
    summary.update(minutes=(time.monotonic() - started) / 60, run_dir=str(run_dir), mlflow_run_id=run.run_id,
                   tracking_uri=uri)
    return summary


def _absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    # Ray workers run in another CWD: every path they see must be absolute (stack notes).
    data = cfg.model_dump()
    d = data["train"]["data"]
    d["train_csv"], d["eval_dir"] = Path(d["train_csv"]).resolve(), Path(d["eval_dir"]).resolve()
    if data["train"]["model"]["init"] is not None:
        data["train"]["model"]["init"] = Path(data["train"]["model"]["init"]).resolve()
    return PretrainConfig.model_validate(data)


def _check_inputs(cfg: PretrainConfig) -> None:
    """Fail before any cluster starts on what is plainly wrong (`session.preflight`, as sweeps do)."""
    from cleansweep import fit as session

    session.preflight(cfg.train)


def _check_run_folder(run_dir: Path, name: str, resume: bool) -> None:
    """Guard against Train V2's silent resume of a re-used name (stack notes)."""
    if run_dir.exists() and not resume:
        raise UserError(f"run {name} exists ({run_dir}); pass --resume to continue it or choose another --name")
    if run_dir.exists() and not (run_dir / RUN_FILE).is_file():
        raise UserError(f"{run_dir} is not a cleansweep pre-training run ({RUN_FILE} missing); choose another --name")


def _open_run_folder(run_dir: Path, cfg: PretrainConfig, resume: bool) -> dict[str, Any]:
    """The run's identity (the uid in its MLflow key): read on resume, created (atomically) on a fresh start."""
    ident_path = run_dir / RUN_FILE
    if run_dir.exists():
        return json.loads(ident_path.read_text())
    if resume:
        print(f"note: no run {cfg.name} under {run_dir.parent} yet; starting it")
    identity = {"name": cfg.name, "uid": uuid.uuid4().hex, "config": cfg.model_dump(mode="json")}
    run_dir.mkdir(parents=True)
    atomic.write_json(ident_path, identity)
    return identity


def objective_name(spec: TrainSpec) -> str:
    """mmcl, mmcl+ssl or ssl, from the loss weights."""
    parts = [n for n, w in (("mmcl", spec.method.mmcl_weight), ("ssl", spec.method.ssl_weight)) if w > 0]
    return "+".join(parts) or spec.method.name


def data_hashes(spec: TrainSpec) -> dict[str, Any]:
    """sha256 of the training CSV and of the poison manifest beside it (None without one), and the eval folder."""
    from cleansweep.models import file_sha256

    manifest = spec.data.train_csv.parent / "manifest.json"
    return {"train_csv": str(spec.data.train_csv), "train_csv_sha256": file_sha256(spec.data.train_csv),
            "poison_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            "eval_dir": str(spec.data.eval_dir)}


def run_tags(cfg: PretrainConfig) -> dict[str, str]:
    """The MLflow tags of a pre-training run (docs/interfaces.md, MLflow layout)."""
    spec = cfg.train
    hashes = data_hashes(spec)
    return {tracking.KIND_TAG: "pretrain", **tracking.pretrain_tags(
        objective=objective_name(spec), dataset=hashes["train_csv"], train_csv_sha256=hashes["train_csv_sha256"],
        attack=spec.attack.name, target=spec.attack.target, eval_dir=hashes["eval_dir"],
        poison_manifest_sha256=hashes["poison_manifest_sha256"])}


def _driver_params(cfg: PretrainConfig) -> dict[str, Any]:
    # The training settings arrive as the session's effective params; these are the driver's own.
    return {"ray": cfg.ray.model_dump(mode="json"), "selection": cfg.selection, "reference_top1": cfg.reference_top1,
            "keep_checkpoints": cfg.keep_checkpoints}


def _loop_config(cfg: PretrainConfig, run_dir: Path, uri: str, run_id: str) -> dict[str, Any]:
    """What every worker receives: plain values and absolute paths only (workers run in another CWD)."""
    return {"spec": cfg.train.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id, "name": cfg.name,
            "run_dir": str(run_dir), "scratch": scratch.name(run_dir), "local": cfg.ray.num_workers == 0,
            "keep": cfg.keep_checkpoints,
            "selection": cfg.selection, "reference_top1": cfg.reference_top1}


@contextmanager
def _cluster(cfg: PretrainConfig) -> Iterator[None]:
    """Connect to (or start) Ray and check the workers fit; nothing for num_workers=0 (in-process)."""
    if cfg.ray.num_workers == 0:
        # Ray's local mode logs every report at INFO; MLflow has them.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        yield
        return
    with cluster.connect(cfg.ray.address):
        check_resources(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, cluster.cluster_capacity())
        yield


def _train(cfg: PretrainConfig, run_dir: Path, loop_config: dict[str, Any]) -> None:
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name, storage_path=str(run_dir.parent),
            # Deterministic failures (bad data, NaN loss) fail again when retried, and the controller's default
            # (-1) retries an unschedulable worker group forever: no retries (reliability notes).
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            # Newest N; the selected model is kept apart in candidate/ (see module docstring).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        user = _user_error_in(e)
        if user is not None:
            raise UserError(str(user)) from None
        raise


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the run (so the CLI prints one line)."""
    stack = [err, *getattr(err, "worker_failures", {}).values()]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)]
    return None


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                    capacity: cluster.Capacity | list[dict]) -> None:
    """Fail fast when the workers can never be placed together (Train would otherwise wait and retry).

    Each worker needs `cpus_per_worker` CPUs (and one GPU with `use_gpu`) on a single node; nodes an autoscaler
    may add count (`cluster.check_resources`).

    Args:
        capacity: `cluster.cluster_capacity()`, or `ray.nodes()` entries (`Alive`, `Resources`).

    Raises:
        UserError: naming what was asked, what the cluster has and the fix.
    """
    if not isinstance(capacity, cluster.Capacity):
        capacity = cluster.Capacity.from_nodes(capacity)
    has_gpus = any(r.get("GPU", 0) > 0 for r in capacity.live) or any(g.resources.get("GPU", 0) > 0
                                                                       for g in capacity.groups)
    ask = f"--num-workers {num_workers} x --cpus-per-worker {cpus_per_worker:g}" + (" + 1 GPU (--use-gpu)"
                                                                                    if use_gpu else "")
    fix = ("drop --use-gpu or connect to a cluster with GPUs (--address)" if use_gpu and not has_gpus else
           "lower --num-workers or --cpus-per-worker, or add nodes (--address)")
    cluster.check_resources({"CPU": cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}, num_workers, capacity,
                            ask=ask, unit="worker", fix=fix)


def _export_selected(cfg: PretrainConfig, run_dir: Path, run: tracking.RunHandle) -> dict[str, Any]:
    """candidate/ -> selected/model.safetensors + model.json (via models.save_checkpoint), logged to MLflow."""
    from cleansweep.models import create_model, load_state_dict_file, load_weights, save_checkpoint

    candidate = _read_candidate(run_dir)
    if candidate is None:
        raise RuntimeError(f"run {cfg.name} reported no evaluation with a checkpoint; nothing to select")
    model = create_model(cfg.train.model.name).model
    load_weights(model, load_state_dict_file(_candidate_dir(run_dir) / WEIGHTS))
    keys = ("zeroshot_top1", "zeroshot_top5", "asr_top1", "epoch")
    card = {**{k: candidate.get(k) for k in keys}, "step": int(candidate["step"]), "selection": cfg.selection,
            "reference_top1": cfg.reference_top1, "metrics": candidate, "config": cfg.model_dump(mode="json"),
            "data": data_hashes(cfg.train), "objective": objective_name(cfg.train), "mlflow_run_id": run.run_id,
            "model": cfg.train.model.name}
    staging = Path(tempfile.mkdtemp(prefix=".selected-", dir=run_dir))
    weights = save_checkpoint(staging / WEIGHTS, model, card)
    atomic.replace_dir(staging, run_dir / layout.SELECTED)
    selected = run_dir / layout.SELECTED / weights.name
    run.log_artifact(selected.with_suffix(".json"), layout.SELECTED)
    run.set_tags(tracking.pretrain_tags(selection=cfg.selection, selected_step=int(candidate["step"]),
                                        selected_zeroshot_top1=candidate["zeroshot_top1"],
                                        selected_asr_top1=candidate.get("asr_top1"), selected_path=str(selected)))
    return {"selected": str(selected), **{k: card[k] for k in (*keys, "step")}}
