"""MLflow Model Registry: a sweep's best feasible model, logged on its parent run and registered as a version."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from cleansweep.tracking.runs import RunHandle
from cleansweep.tracking.tags import BEST_MODEL_TAG


def register_best_model(parent: RunHandle, model_dir: Path, *, sweep: str, description: str,
                        tags: Mapping[str, Any]) -> dict[str, str]:
    """Log the sweep's best feasible model (weights + card) on its parent run and register it in the Model Registry.

    Args:
        parent: The sweep's parent run.
        model_dir: Folder with `model.safetensors` and `model.json` (the card).
        sweep: Sweep name; the registered model is `cleansweep-<sweep>`, one version per call.
        description: Version description (accuracy, ASR, trial, step).
        tags: Version tags (trial id, metrics, sampled hyperparameters).

    Returns:
        `{"name", "version", "source"}` of the registered version.
    """
    parent.log_artifact(model_dir, "best_model")
    client = parent.client
    name = f"cleansweep-{sweep}"
    try:
        client.create_registered_model(name, description=f"best feasible model of cleansweep sweep {sweep}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(parent.run_id).info.artifact_uri}/best_model"
    version = client.create_model_version(name, source=source, run_id=parent.run_id, description=description,
                                          tags={k: str(v) for k, v in tags.items()})
    parent.set_tags({BEST_MODEL_TAG: f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "source": source}
