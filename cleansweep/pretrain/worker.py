"""The per-worker half of pre-training: `train_worker`, the function every Ray Train worker runs.

It calls `fit.fit` (the only wiring of a training run) with a report adapter: rank 0 logs each evaluation to MLflow
(one batch, never a step twice) and keeps the selection candidate (`selection`); every rank calls
`ray.train.report`. With num_workers=0 the driver runs it in-process and it keeps the newest checkpoints itself.

Progress: rank 0 prints a line every ~10 s of training and at every evaluation (epoch, step, loss, the last
top-1/ASR, throughput, ETA), so a long pre-training is never silent.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
import ray.train

from cleansweep import tracking
from cleansweep.pretrain.selection import Selector, read_candidate, write_candidate
from cleansweep.runtime import atomic, layout, scratch, storage
from cleansweep.train_config import TrainSpec


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker (also run in-process when num_workers=0): resume if a checkpoint exists, then fit."""
    from cleansweep import fit as session

    spec = TrainSpec.model_validate(config["spec"])
    run_dir = storage.parse_location(config["run_dir"])  # an object-storage URI stays a str
    rank = ray.train.get_context().get_world_rank()
    nodes = _worker_nodes(config["local"])
    handle = None
    if rank == 0:
        handle = tracking.RunHandle.reopen(config["tracking_uri"], config["run_id"])
        handle.set_tags(tracking.pretrain_tags(worker_nodes=",".join(nodes), num_nodes=len(set(nodes))))
    selector = Selector(config["selection"], config["reference_top1"], read_candidate(run_dir))
    progress = ProgressLine(config["name"]) if rank == 0 else None
    reporter = _Reporter(rank=rank, local=config["local"], run_dir=run_dir, keep=config["keep"], run=handle,
                         selector=selector, progress=progress)
    with scratch.folder(config["scratch"], f"rank{rank}") as in_flight:
        if config["local"]:
            latest = latest_local_checkpoint(Path(run_dir))  # in-process runs keep a local folder (PretrainConfig)
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
        storage.write_json(storage.join(run_dir, layout.PRETRAIN_DONE_FILE),
                           {"step": summary["step"], "last": flat_metrics(summary.get("last", {}))})


class _Reporter:
    """The `report(metrics, checkpoint_dir)` adapter handed to `fit.fit`."""

    def __init__(self, *, rank: int, local: bool, run_dir: storage.Location, keep: int, run: tracking.RunHandle | None,
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
                write_candidate(Path(checkpoint_dir), storage.join(self.run_dir, layout.CANDIDATE), flat)
        name = layout.checkpoint_name(step)
        if self.local:
            if checkpoint_dir:
                _keep_local_checkpoint(Path(checkpoint_dir), Path(self.run_dir) / name, self.keep)
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


def _keep_local_checkpoint(checkpoint_dir: Path, dest: Path, keep: int) -> None:
    # num_workers=0 runs without Ray's storage, so keep the newest `keep` checkpoints ourselves.
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    atomic.replace_dir(tmp, dest)
    for old in sorted(dest.parent.glob(f"{layout.CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint_step_*` folder of a run (names sort by step)."""
    found = sorted(p for p in Path(run_dir).glob(f"{layout.CHECKPOINT_PREFIX}*") if p.is_dir())
    return found[-1] if found else None
