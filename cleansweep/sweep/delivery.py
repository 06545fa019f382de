"""What a finished sweep hands over: its best feasible checkpoint, checked to exist and load before it is registered.

A sweep whose answer cannot be delivered must not look successful: `best_checkpoint_problem` says why, naming the
trial and the path; `search.write_outputs` tags the parent run with it (`cleansweep.best_model_problem`), registers
nothing, and `cleansweep search` prints it on stderr and exits 3, after writing the leaderboard as always.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cleansweep.errors import UserError
from cleansweep.runtime import layout, storage

EXIT_BEST_MODEL_LOST = 3  # `cleansweep search`: the sweep ran, but its best model cannot be delivered


def best_checkpoint_problem(trial_id: str, checkpoint: Any) -> str | None:
    """Why the best trial's checkpoint cannot be delivered, or None when its weights exist and load (the project's
    safe loader, into the model its card names).

    Args:
        trial_id: The best feasible trial.
        checkpoint: Its leaderboard `checkpoint` (the folder Tune persisted, or its s3:// / gs:// URI; None or NaN
            when none was recorded).
    """
    if not isinstance(checkpoint, str) or not checkpoint:
        return f"best trial {trial_id}: no checkpoint of its best feasible evaluation was recorded"
    weights = storage.join(storage.parse_location(checkpoint), layout.MODEL_FILE)
    if not storage.is_file(weights):
        return f"best trial {trial_id}: its best checkpoint {weights} is missing"
    from cleansweep.models import load_checkpoint_model  # torch only here, once per sweep

    staging = storage.local_staging("best") if storage.is_remote(weights) else None
    try:
        load_checkpoint_model(fetch_weights(weights, staging) if staging else weights)
    except UserError as e:
        return f"best trial {trial_id}: its best checkpoint {weights} does not load ({e})"
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return None


def fetch_weights(weights: storage.Location, folder: Path) -> Path:
    """Copy a checkpoint's weights and their card (model.json, if any) from object storage into local `folder`;
    returns the local weights file (what the project's loaders read)."""
    local = storage.download(weights, folder / layout.MODEL_FILE)
    card = storage.join(storage.parent(weights), local.with_suffix(".json").name)
    if storage.is_file(card):
        storage.download(card, local.with_suffix(".json"))
    return local
