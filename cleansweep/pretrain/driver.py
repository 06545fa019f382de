"""Poisoned pre-training on Ray Train: the driver, `pretrain`.

It checks everything that can be checked before a cluster is touched (inputs, run folder, resources), opens the
MLflow run, launches `TorchTrainer(worker.train_worker)` and, once training has ended, exports the selected
evaluation's model (`selection.export_selected`) and logs its card.

Layout of `<workdir>/pretrain/NAME/` (also Ray's `storage_path/name`): see `layout.py`; with `storage_path` set, the
same run folder is `<storage_path>/NAME/`, and for an s3:// or gs:// URI everything in it is an object there
(`run_location`), so the driver, the workers and a later `--resume` find it from any node. The last
`keep_checkpoints` resumable checkpoints (Ray's, or ours with num_workers=0); `candidate/` holds the best evaluation
so far under `selection` (written by rank 0 eagerly, so Ray pruning old checkpoints never loses the selected one);
`selected/` is written once training ends and is what cleaning consumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cleansweep import tracking
from cleansweep.errors import UserError
from cleansweep.pretrain.selection import CARD_KEYS, data_hashes, export_selected, objective_name
from cleansweep.pretrain.worker import train_worker
from cleansweep.runtime import cluster, layout, scratch, storage
from cleansweep.train_config import PretrainConfig

RUN_FILE, DONE_FILE = layout.PRETRAIN_RUN_FILE, layout.PRETRAIN_DONE_FILE


def pretrain(cfg: PretrainConfig, *, workdir: Path, resume: bool = False) -> dict[str, Any]:
    """Pre-train a CLIP model on (poisoned) data with Ray Train and export the selected checkpoint.

    Args:
        cfg: Validated configuration; relative paths are taken relative to the current directory.
        workdir: Holds `pretrain/NAME/` (unless `cfg.storage_path` says where) and, by default, the MLflow database.
        resume: Continue run NAME from its last checkpoint (without it an existing NAME is an error).

    Returns:
        Summary: `selected` (path or URI of model.safetensors), `zeroshot_top1`, `asr_top1`, `step`, `epoch`, `minutes`,
        `run_dir`, `mlflow_run_id`, `tracking_uri`.
    """
    started = time.monotonic()
    cfg = absolute_paths(cfg)
    run_dir = run_location(cfg, workdir)
    storage.check_storage(run_dir)  # credentials, endpoint and bucket: one line now, not a Ray traceback later
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
            storage.remove_file(storage.join(run_dir, DONE_FILE))
            _train(cfg, run_dir, _loop_config(cfg, run_dir, uri, run.run_id))
            if not storage.is_file(storage.join(run_dir, DONE_FILE)):
                raise KeyboardInterrupt  # Ray aborted the run (Ctrl-C): what was reported is kept, resume later
            scratch.remove(scratch.name(str(run_dir)))  # what killed workers on this node left (other nodes: at resume)
            summary = _export_selected(cfg, run_dir, run)
        except BaseException as e:
            run.end(tracking.exit_status(e))
            raise
        run.end("FINISHED")
    summary.update(minutes=(time.monotonic() - started) / 60, run_dir=str(run_dir), mlflow_run_id=run.run_id,
                   tracking_uri=uri)
    return summary


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    # Ray Train changes each worker's working directory to the run's own folder (WorkingDirectorySetupCallback,
    # ray/train/v2/_internal/callbacks/working_dir_setup.py): a relative path would point somewhere else there.
    data = cfg.model_dump()
    d = data["train"]["data"]
    if d["train_csv"] is not None:
        d["train_csv"] = Path(d["train_csv"]).resolve()
    else:  # lexically: the pattern's braces name no file
        d["train_shards"] = os.path.abspath(d["train_shards"])
    d["eval_dir"] = Path(d["eval_dir"]).resolve()
    if data["train"]["model"]["init"] is not None:
        data["train"]["model"]["init"] = Path(data["train"]["model"]["init"]).resolve()
    return PretrainConfig.model_validate(data)


def _check_inputs(cfg: PretrainConfig) -> None:
    """Fail before any cluster starts on what is plainly wrong (`fit.preflight`, as sweeps do)."""
    from cleansweep import fit as session

    session.preflight(cfg.train)


def run_location(cfg: PretrainConfig, workdir: Path) -> storage.Location:
    """Folder of run NAME: `<storage_path>/NAME` (a `str` URI for object storage), else `<workdir>/pretrain/NAME`."""
    if cfg.storage_path is None:
        return layout.pretrain_dir(workdir, cfg.name)
    if storage.is_remote(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name)
    return Path(cfg.storage_path).resolve() / cfg.name


def _check_run_folder(run_dir: storage.Location, name: str, resume: bool) -> None:
    """Refuse a re-used name unless `resume`: Ray Train restores any run it finds under `storage_path/name`.

    Its checkpoint manager loads the snapshot of an earlier run of that name when it starts
    (`_maybe_load_state_from_storage`, ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py), so without
    this check a new run would silently continue an old one.
    """
    if not storage.exists(run_dir):
        return
    if not resume:
        raise UserError(f"run {name} exists ({run_dir}); pass --resume to continue it or choose another --name")
    if not storage.is_file(storage.join(run_dir, RUN_FILE)):
        raise UserError(f"{run_dir} is not a cleansweep pre-training run ({RUN_FILE} missing); choose another --name")


def _open_run_folder(run_dir: storage.Location, cfg: PretrainConfig, resume: bool) -> dict[str, Any]:
    """The run's identity (the uid in its MLflow key): read on resume, created (atomically) on a fresh start."""
    ident_path = storage.join(run_dir, RUN_FILE)
    if storage.exists(run_dir):
        return json.loads(storage.read_bytes(ident_path))
    if resume:
        print(f"note: no run {cfg.name} under {storage.parent(run_dir)} yet; starting it")
    identity = {"name": cfg.name, "uid": uuid.uuid4().hex, "config": cfg.model_dump(mode="json")}
    if not storage.is_remote(run_dir):
        Path(run_dir).mkdir(parents=True)
    storage.write_json(ident_path, identity)  # one object, whole or absent, on object storage
    return identity


def run_tags(cfg: PretrainConfig) -> dict[str, str]:
    """The MLflow tags of a pre-training run (docs/interfaces.md, MLflow layout)."""
    spec = cfg.train
    hashes = data_hashes(spec)
    return {tracking.KIND_TAG: "pretrain", **tracking.pretrain_tags(
        objective=objective_name(spec), dataset=spec.data.train_source, train_csv_sha256=hashes.get("train_csv_sha256"),
        train_shards_sha256=hashes.get("train_shards_sha256"), attack=spec.attack.name, target=spec.attack.target,
        eval_dir=hashes["eval_dir"],
        poison_manifest_sha256=hashes["poison_manifest_sha256"])}


def _driver_params(cfg: PretrainConfig) -> dict[str, Any]:
    # The training settings arrive as the session's effective params; these are the driver's own.
    return {"ray": cfg.ray.model_dump(mode="json"), "selection": cfg.selection, "reference_top1": cfg.reference_top1,
            "keep_checkpoints": cfg.keep_checkpoints}


def _loop_config(cfg: PretrainConfig, run_dir: storage.Location, uri: str, run_id: str) -> dict[str, Any]:
    """What every worker receives: plain values and absolute paths only (workers run in another CWD)."""
    return {"spec": cfg.train.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id, "name": cfg.name,
            "run_dir": str(run_dir), "scratch": scratch.name(str(run_dir)), "local": cfg.ray.num_workers == 0,
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


def _train(cfg: PretrainConfig, run_dir: storage.Location, loop_config: dict[str, Any]) -> None:
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            # A URI goes to Ray as it is: Train resolves it with pyarrow's `FileSystem.from_uri` (`get_fs_and_path`,
            # ray/train/_internal/storage.py) and its workers persist checkpoints there themselves.
            name=cfg.name, storage_path=str(storage.parent(run_dir)),
            # Deterministic failures (bad data, NaN loss) fail again when retried, and `controller_failure_limit`
            # defaults to -1: a worker group that never starts (WorkerGroupStartupTimeoutError) is retried forever
            # (FailureConfig, ray/train/v2/api/config.py; failure_handling/default.py). So: no retries.
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


def _export_selected(cfg: PretrainConfig, run_dir: storage.Location, run: tracking.RunHandle) -> dict[str, Any]:
    """Write selected/ from candidate/ (`selection.export_selected`), log its card to MLflow; return the summary."""
    selected, card = export_selected(cfg, run_dir, run.run_id)
    card_file = storage.join(storage.parent(selected), Path(str(selected)).with_suffix(".json").name)
    if storage.is_remote(card_file):  # MLflow logs a local file: the card as it landed in the bucket
        staging = storage.local_staging("card")
        try:
            run.log_artifact(storage.download(card_file, staging / Path(str(card_file)).name), layout.SELECTED)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        run.log_artifact(Path(card_file), layout.SELECTED)
    run.set_tags(tracking.pretrain_tags(selection=cfg.selection, selected_step=card["step"],
                                        selected_zeroshot_top1=card["zeroshot_top1"],
                                        selected_asr_top1=card.get("asr_top1"), selected_path=str(selected)))
    return {"selected": str(selected), **{k: card[k] for k in (*CARD_KEYS, "step")}}
