"""Names and places on disk: the one owner of folder layouts, file names, run-name slugs and the objectives table.

Everything under a working directory (`cleansweep-runs/` or $CLEANSWEEP_WORKDIR):

    data/demo/, data/demo-ATTACK/            the demo world and its poisoned training set (presets)
    mlflow.db, mlartifacts/                  the default MLflow store (tracking)
    pretrain/NAME/                           one pre-training run (pretrain): run.json, checkpoint_step_*/,
                                             candidate/, trained.json, selected/model.safetensors + model.json
                                             (or STORAGE_PATH/NAME/ with `--storage-path`, a folder or a URI)
    sweeps/NAME/                             one sweep (search): sweep.json, space.yaml, preselect.json,
                                             main/ and preselect/ (Tune's experiments), leaderboard.csv, pareto.png
    reports/NAME/                            `cleansweep report NAME`
    scans/<checkpoint>-<folder>/             a proxy-ASR sweep's scan of its starting model (scan.json, inversion)
    checkpoints/<uri hash>/                  a sweep's starting model downloaded from object storage (+ its card)
    study/PRESET/                            `cleansweep study PRESET`

A training checkpoint directory (session): model.safetensors + model.json (weights and card), state.pt
(optimizer and RNG state, resume only), loop.json (step, best-feasible tracker).

Pure names and paths (no I/O): the drivers and the science modules both import it, so it stays at the bottom.
"""

from __future__ import annotations

from pathlib import Path

# ------------------------------------------------------------------------------------- pre-training objectives
OBJECTIVES: dict[str, dict[str, object]] = {
    "mmcl": {"label": "MMCL", "weights": {"mmcl_weight": 1.0, "ssl_weight": 0.0}},
    "mmcl+ssl": {"label": "MMCL+SSL", "weights": {"mmcl_weight": 1.0, "ssl_weight": 1.0}},
}


def slug(objective: str) -> str:
    """`mmcl+ssl` -> `mmcl-ssl` (run names and folders allow letters, digits, '_', '.', '-')."""
    return objective.replace("+", "-")


def objective_label(objective: str) -> str:
    """`mmcl+ssl` -> `MMCL+SSL`, as tables and figures print it."""
    return str(OBJECTIVES[objective]["label"])


def objective_weights(objective: str) -> dict[str, float]:
    """The loss weights (`mmcl_weight`, `ssl_weight`) of a pre-training objective."""
    return dict(OBJECTIVES[objective]["weights"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- run names
def preset_run_name(preset: str, objective: str) -> str:
    """The pre-training run of a preset model (`cleansweep pretrain --preset demo`, and sweeps of `preset: demo`)."""
    return f"{preset}-{slug(objective)}"


def study_run_names(preset: str, objectives: list[str] | None = None) -> dict[str, dict[str, str]]:
    """objective -> {"pretrain": run name, "sweep": sweep name} of a study preset."""
    return {o: {"pretrain": f"study-{preset}-{slug(o)}", "sweep": f"study-{preset}-{slug(o)}-clean"}
            for o in (objectives or list(OBJECTIVES))}


def trial_run_name(sweep: str, trial_id: str) -> str:
    """MLflow run name of one trial (from its Tune trial id, never a timestamp)."""
    return f"{sweep}-{trial_id}"


# ------------------------------------------------------------------------------------- working directory
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def demo_data_dirs(workdir: str | Path, attack: str) -> dict[str, Path]:
    """The demo world (`world`) and its training set poisoned with `attack` (`poisoned`)."""
    data = Path(workdir) / "data"
    return {"world": data / "demo", "poisoned": data / f"demo-{attack}"}


def report_dir(workdir: str | Path, sweep: str) -> Path:
    """Default output folder of `cleansweep report NAME`."""
    return Path(workdir) / "reports" / sweep


def scan_dir(workdir: str | Path, checkpoint_sha256: str, eval_dir: str) -> Path:
    """Where a sweep's automatic scan of its starting model is cached (one per checkpoint and evaluation folder)."""
    import hashlib

    folder = hashlib.sha1(str(Path(eval_dir).resolve()).encode()).hexdigest()[:8]
    return Path(workdir) / "scans" / f"{checkpoint_sha256[:16]}-{folder}"


def fetched_checkpoint_dir(workdir: str | Path, uri: str) -> Path:
    """Where a sweep keeps its copy of a starting model given as an s3:// or gs:// URI (one folder per URI)."""
    import hashlib

    return Path(workdir).resolve() / "checkpoints" / hashlib.sha1(uri.encode()).hexdigest()[:12]


INVERSION_FILE = "inversion.safetensors"  # `cleansweep scan`: the inverted mask and pattern (+ inversion.json card)


def study_dir(workdir: str | Path, preset: str) -> Path:
    """Output folder of `cleansweep study PRESET`."""
    return Path(workdir) / "study" / preset


# ------------------------------------------------------------------------------------- pre-training runs
PRETRAIN_RUN_FILE = "run.json"  # identity of the run: uid of its MLflow key, the first config
PRETRAIN_DONE_FILE = "trained.json"  # written when training reached its end (an aborted Ray run returns too)
CHECKPOINT_PREFIX = "checkpoint_step_"
CANDIDATE = "candidate"  # weights + metrics of the best evaluation so far under the selection rule
CANDIDATE_FILE = "candidate.json"
SELECTED = "selected"  # what cleaning consumes: model.safetensors + model.json


def pretrain_dir(workdir: str | Path, name: str) -> Path:
    """Folder of pre-training run NAME (also Ray Train's `storage_path/name`)."""
    return Path(workdir).resolve() / "pretrain" / name


def checkpoint_name(step: int) -> str:
    """Folder name of a pre-training checkpoint (names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def selected_checkpoint(workdir: str | Path, name: str) -> Path:
    """The selected model of a finished pre-training run (its card beside it as model.json)."""
    return pretrain_dir(workdir, name) / SELECTED / MODEL_FILE


# ------------------------------------------------------------------------------------- sweeps
SWEEP_FILE = "sweep.json"  # identity of the sweep: name and the config it started with
SPACE_FILE = "space.yaml"
PRESELECT_FILE = "preselect.json"  # the perturbed model chosen by stage 1 of two-stage shrink-and-perturb
LEADERBOARD_FILE = "leaderboard.csv"
PARETO_FILE = "pareto.png"
STAGES = ("preselect", "main")  # Tune experiment folders inside a sweep folder


def default_storage(workdir: str | Path) -> Path:
    """Where sweeps live unless `--storage-path` / `storage_path` says otherwise."""
    return Path(workdir) / "sweeps"


def sweep_dir(storage: str | Path, name: str) -> Path:
    """Folder of sweep NAME under a storage folder."""
    return Path(storage).resolve() / name


def sweep_exists(storage: str | Path, name: str) -> bool:
    """Whether sweep NAME was started under `storage` (its identity file exists)."""
    return (sweep_dir(storage, name) / SWEEP_FILE).is_file()


# ------------------------------------------------------------------------------------- checkpoint directories
MODEL_FILE = "model.safetensors"  # weights; its card is model.json beside it
STATE_FILE = "state.pt"  # optimizer moments, task extras, RNG: read by a resume only (2/3 of a checkpoint)
LOOP_STATE = "loop.json"  # step and best-feasible tracker
TRIAL_STATE = "cleansweep_trial.json"  # in a sweep trial's checkpoints: MLflow run id, running minimum ASR
