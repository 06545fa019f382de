"""Which evaluation's model a pre-training run hands to cleaning, and the card that describes it.

During training rank 0 offers every evaluation to a `Selector`; the best one so far under the run's `selection` rule
is copied eagerly to `candidate/` (so Ray pruning old checkpoints never loses it). When training has ended,
`export_selected` writes `selected/model.safetensors` + `model.json` (the card) from it: what cleaning consumes and
what `selected_card` reads back. The run folder may be an object-storage URI (`runtime.storage`): then candidate/ and
selected/ are objects there, written so that a reader never pairs a record with other weights. No Ray and no MLflow
here: the driver logs the card.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cleansweep.errors import UserError
from cleansweep.runtime import atomic, layout, storage
from cleansweep.train_config import PretrainConfig, TrainSpec

CARD_KEYS = ("zeroshot_top1", "zeroshot_top5", "asr_top1", "epoch")  # the card's headline metrics (+ step)


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


# ------------------------------------------------------------------------------------------------ candidate/
# A local candidate/ is replaced as one folder (`atomic.replace_dir`). Object storage has no rename, so there the
# weights go to a new object of their own name first and candidate.json, written last, names them (WEIGHTS_KEY): a
# crash between the two leaves the previous pair complete, and a reader never pairs metrics with other weights. The
# weights objects no record names are deleted after each write.
WEIGHTS_KEY = "weights"


def write_candidate(checkpoint_dir: Path, dest: storage.Location, metrics: Mapping[str, float]) -> None:
    """Copy a checkpoint's weights and its metrics to `dest` (the run's `candidate/`), replacing it atomically."""
    weights = checkpoint_dir / layout.MODEL_FILE
    if not weights.is_file():
        raise RuntimeError(f"session checkpoint {checkpoint_dir} has no {layout.MODEL_FILE}; cannot keep the selected "
                           "model")
    if storage.is_remote(dest):
        _write_remote_candidate(weights, str(dest), metrics)
        return
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(weights, tmp / layout.MODEL_FILE)
    atomic.write_json(tmp / layout.CANDIDATE_FILE, dict(metrics))
    atomic.replace_dir(tmp, dest)


def _write_remote_candidate(weights: Path, dest: str, metrics: Mapping[str, float]) -> None:
    name = f"model-{int(metrics['step']):09d}-{uuid.uuid4().hex[:8]}.safetensors"  # never an object already named
    storage.upload(weights, storage.join(dest, name))
    storage.write_json(storage.join(dest, layout.CANDIDATE_FILE), {**metrics, WEIGHTS_KEY: name})
    for old in storage.list_files(dest):
        if old.endswith(".safetensors") and old != name:
            storage.remove_file(storage.join(dest, old))


def candidate_dir(run_dir: Path) -> Path:
    """The run's `candidate/` folder, or the previous one that a crash inside `atomic.replace_dir` left as `.old`."""
    current = run_dir / layout.CANDIDATE
    return current if current.is_dir() else atomic.previous_dir(current)


def candidate_record(run_dir: storage.Location) -> tuple[dict[str, float], storage.Location] | None:
    """The metrics of the run's current candidate and where its weights are, or None before its first evaluation with
    a checkpoint (both read from one record, so they always belong together)."""
    if storage.is_remote(run_dir):
        record = storage.join(run_dir, layout.CANDIDATE, layout.CANDIDATE_FILE)
        if not storage.is_file(record):
            return None
        metrics = json.loads(storage.read_bytes(record))
        return metrics, storage.join(run_dir, layout.CANDIDATE, str(metrics.pop(WEIGHTS_KEY)))
    folder = candidate_dir(Path(run_dir))
    path = folder / layout.CANDIDATE_FILE
    return (json.loads(path.read_text()), folder / layout.MODEL_FILE) if path.is_file() else None


def read_candidate(run_dir: storage.Location) -> dict[str, float] | None:
    """The metrics of the run's current candidate, or None before its first evaluation with a checkpoint."""
    record = candidate_record(run_dir)
    return None if record is None else record[0]


# ------------------------------------------------------------------------------------------------ selected/
def objective_name(spec: TrainSpec) -> str:
    """mmcl, mmcl+ssl or ssl, from the loss weights."""
    parts = [n for n, w in (("mmcl", spec.method.mmcl_weight), ("ssl", spec.method.ssl_weight)) if w > 0]
    return "+".join(parts) or spec.method.name


def data_hashes(spec: TrainSpec) -> dict[str, Any]:
    """sha256 of the training data (the CSV, or `shards_sha256` of the shards) and of the poison manifest beside it
    (None without one), and the eval folder."""
    from cleansweep.models import file_sha256

    if spec.data.train_shards is not None:
        from cleansweep.data.shards import expand_shards

        shards = expand_shards(spec.data.train_shards)
        manifest = shards[0].parent / "manifest.json"
        train = {"train_shards": spec.data.train_shards, "train_shards_sha256": shards_sha256(shards)}
    else:
        manifest = spec.data.train_csv.parent / "manifest.json"
        train = {"train_csv": str(spec.data.train_csv), "train_csv_sha256": file_sha256(spec.data.train_csv)}
    return {**train, "poison_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            "eval_dir": str(spec.data.eval_dir)}


def shards_sha256(shards: list[Path]) -> str:
    """sha256 over the sorted `name<TAB>byte size` lines of the shards: a fingerprint that costs one stat per shard.

    Hashing the contents would read the whole dataset (terabytes at the paper's scale) at every run start; a shard
    rewritten with another content of the very same byte size goes unnoticed.
    """
    import hashlib

    lines = sorted(f"{s.name}\t{s.stat().st_size}\n" for s in shards)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def export_selected(cfg: PretrainConfig, run_dir: storage.Location, mlflow_run_id: str
                    ) -> tuple[storage.Location, dict[str, Any]]:
    """candidate/ -> selected/model.safetensors + model.json (via `models.save_checkpoint`), replaced atomically
    (`publish_selected` for object storage).

    Returns:
        The selected weights' path (a URI for object storage) and the card written beside them.
    """
    from cleansweep.models import save_checkpoint

    found = candidate_record(run_dir)
    if found is None:
        raise RuntimeError(f"run {cfg.name} reported no evaluation with a checkpoint; nothing to select")
    candidate, weights = found
    if storage.is_remote(run_dir):
        staging = storage.local_staging("selected")
        try:
            local = storage.download(weights, staging / "candidate.safetensors")
            model, card = _selected_model(cfg, candidate, local, mlflow_run_id)
            saved = save_checkpoint(staging / layout.MODEL_FILE, model, card)
            return publish_selected(saved, str(storage.join(run_dir, layout.SELECTED))), card
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    model, card = _selected_model(cfg, candidate, Path(weights), mlflow_run_id)
    staging = Path(tempfile.mkdtemp(prefix=".selected-", dir=run_dir))
    saved = save_checkpoint(staging / layout.MODEL_FILE, model, card)
    atomic.replace_dir(staging, Path(run_dir) / layout.SELECTED)
    return Path(run_dir) / layout.SELECTED / saved.name, card


def _selected_model(cfg: PretrainConfig, candidate: Mapping[str, float], weights: Path, mlflow_run_id: str
                    ) -> tuple[Any, dict[str, Any]]:
    """The candidate's model (loaded the safe way) and the card of selected/."""
    from cleansweep.models import create_model, load_state_dict_file, load_weights

    model = create_model(cfg.train.model.name).model
    load_weights(model, load_state_dict_file(weights))
    card = {**{k: candidate.get(k) for k in CARD_KEYS}, "step": int(candidate["step"]), "selection": cfg.selection,
            "reference_top1": cfg.reference_top1, "metrics": dict(candidate), "config": cfg.model_dump(mode="json"),
            "data": data_hashes(cfg.train), "objective": objective_name(cfg.train), "mlflow_run_id": mlflow_run_id,
            "model": cfg.train.model.name}
    return model, card


def publish_selected(weights: Path, dest: str) -> str:
    """Upload local weights and their card (model.json beside them) to folder URI `dest`; returns the weights' URI.

    The card goes last and the previous one is deleted first: a card in the bucket always describes the weights
    beside it, and a consumer that finds no card finds no finished export.
    """
    card = storage.join(dest, weights.with_suffix(".json").name)
    storage.remove_file(card)
    storage.upload(weights, storage.join(dest, weights.name))
    storage.upload(weights.with_suffix(".json"), card)
    return str(storage.join(dest, weights.name))


def selected_card(workdir: Path, run_name: str) -> dict[str, Any] | None:
    """The card (`selected/model.json`) of a finished pre-training run, with its `checkpoint` path, or None."""
    card = layout.selected_checkpoint(workdir, run_name).with_suffix(".json")
    if not card.is_file():
        return None
    data = json.loads(card.read_text())
    return {**data, "checkpoint": str(card.with_name(layout.MODEL_FILE))}
