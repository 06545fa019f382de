"""A sweep's configuration (search_spaces/*.yaml): the model to clean, the objective, the spaces, the searcher.

Validated once at the edge like every config (see `cleansweep.config`); the training fields a trial receives are
`cleansweep.train_config.TrainSpec`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from cleansweep.config import AttackSpec, DataSpec, Domain, MlflowSpec, Scalar, Seed, Strict, check_name, number_or_text
from cleansweep.limits import MAX_COUNT, MAX_GRID_POINTS, MAX_STEPS, MAX_WORKERS
from cleansweep.runtime import storage


class SweepAttackSpec(AttackSpec):
    """A sweep's `attack:`. The trigger is the one the checkpoint's card (or `manifest`) records; the fields the file
    writes go on top of it, and one that contradicts the record is refused unless `override` is true."""

    manifest: Path | None = Field(None, description="Poison manifest (manifest.json of `cleansweep poison`) of the "
                                  "model's training data: the trigger it records is the one ASR is measured with.")
    override: bool = Field(False, description="Measure ASR with the fields written here even where they contradict "
                           "the trigger the card or manifest records.")

    def written(self) -> dict[str, Any]:
        """The trigger fields the file sets (defaults are not written: they never beat the recorded trigger)."""
        return self.model_dump(mode="json", include=set(self.model_fields_set) - {"manifest", "override"})



def _param_space(value: Any) -> dict[str, Domain | Scalar]:
    """Dotted key -> fixed value or Domain, with one clean message naming the bad key."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of dotted keys (optim.lr, method.name, ...), got {type(value).__name__}")
    out: dict[str, Domain | Scalar] = {}
    for key, v in value.items():
        if isinstance(v, Domain | bool | int | float | str):
            out[str(key)] = number_or_text(v)
        elif isinstance(v, dict):
            try:
                out[str(key)] = Domain.model_validate(v)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = "unknown key; use choice, uniform, loguniform or grid" if first["type"] == "extra_forbidden" \
                    else first["msg"].removeprefix("Value error, ")
                raise ValueError(f"{key}{'.' + where if where else ''}: {msg}") from None
        else:
            raise ValueError(f"{key}: expected a value or {{choice|uniform|loguniform|grid: ...}}, "
                             f"got {type(v).__name__}")
    return out


ParamSpace = Annotated[dict[str, Any], BeforeValidator(_param_space)]


class StartModelSpec(Strict):
    # str, not Path: Path folds the `//` of an s3:// or gs:// URI (`runtime.storage`).
    checkpoint: str | Path | None = Field(None, description="Pre-trained checkpoint to clean (its JSON card beside "
                                          "it): a file, or an s3:// / gs:// URI of one or of the folder holding "
                                          "model.safetensors (a pre-training run's selected/).")
    preset: Literal["demo"] | None = Field(None, description="Build (or reuse the cached) pre-trained preset model.")
    objective: Literal["mmcl", "mmcl+ssl"] = Field("mmcl", description="Pre-training objective of the preset.")
    name: str | None = Field(None, description="Model config name; None = from the checkpoint's card.")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _location(cls, v: str | Path | None) -> str | Path | None:
        return storage.location_value(v)

    @model_validator(mode="after")
    def _one_source(self) -> StartModelSpec:
        if (self.checkpoint is None) == (self.preset is None):
            raise ValueError("give exactly one of checkpoint (a file) or preset (e.g. demo)")
        return self


class ObjectiveSpec(Strict):
    metric: Literal["zeroshot_top1"] = Field("zeroshot_top1", description="Maximised metric.")
    mode: Literal["max"] = Field("max", description="Direction of the metric.")
    constraint: Literal["asr_top1", "proxy_asr_top1"] = Field(
        "asr_top1", description="Constrained metric (must stay <= threshold): the known trigger's ASR, or the proxy "
        "ASR of the trigger `cleansweep scan` inverted (a defender who does not know the trigger).")
    asr: Literal["true", "proxy"] | None = Field(
        None, description="Shorthand for constraint: true = asr_top1, proxy = proxy_asr_top1.")
    inversion: Path | None = Field(
        None, description="inversion.safetensors of `cleansweep scan` for the proxy ASR; None with the proxy: the "
        "sweep scans its starting model first.")
    threshold: float = Field(0.05, ge=0, le=1, description="Feasible when the constrained ASR <= threshold.")

    @model_validator(mode="before")
    @classmethod
    def _asr_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("asr") is not None:
            implied = {"true": "asr_top1", "proxy": "proxy_asr_top1"}.get(data["asr"], data["asr"])
            if data.get("constraint", implied) != implied:
                raise ValueError(f"asr {data['asr']!r} and constraint {data['constraint']!r} disagree; give one")
            data = {**data, "constraint": implied}
        return data


class SearchAlgoSpec(Strict):
    algorithm: Literal["optuna", "grid", "random"] = Field(
        "optuna", description="optuna = constrained TPE; random = Optuna's random sampler; grid = every point."
    )
    num_samples: int | None = Field(None, ge=1, le=MAX_COUNT,
                                    description="Trials (optuna/random, default 8); grid: repeats.")
    max_concurrent: int = Field(2, ge=1, le=MAX_WORKERS, description="Trials running at once.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")
    n_startup_trials: int = Field(4, ge=1, le=MAX_COUNT, description="Random trials before TPE models the space.")
    max_grid_points: int = Field(MAX_GRID_POINTS, ge=1, description="Refuse a grid (or preselection grid) of more "
                                 "points than this before expanding it; raise it to run a bigger grid.")


class SchedulerSpec(Strict):
    name: Literal["asha", "none"] = Field("asha", description="Early stopping of weak trials (ASHA) or none.")
    time_attr: Literal["epoch", "evaluation"] = Field(
        "epoch", description="Explicit counter ASHA measures time in (restored with the trial, unlike wall time)."
    )
    grace_period: float = Field(2.0, gt=0, description="Time (in time_attr units) every trial gets before a cut.")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA keeps 1/reduction_factor at each rung.")


class ResourcesSpec(Strict):
    cpu: float = Field(1.0, gt=0, le=MAX_WORKERS, description="CPUs per trial.")
    gpu: float = Field(0.0, ge=0, le=MAX_WORKERS,
                       description="GPUs per trial (fractions share a GPU; bookkeeping only).")


class PreselectSpec(Strict):
    """The paper's two-stage shrink-and-perturb: evaluate a grid of perturbed models, then finetune the best."""

    space: ParamSpace = Field(description="Grid of the perturbed models (epochs=0 trials).")
    max_asr: float = Field(0.15, ge=0, le=1, description="Keep the most accurate perturbed model with ASR < this.")


def _method_spaces(value: Any) -> Any:
    if isinstance(value, dict):
        bad = [k for k, v in value.items() if v is not None and not isinstance(v, dict)]
        if bad:
            raise ValueError(f"{bad[0]}: expected a mapping of that method's parameters ({{}} for none)")
        return {k: _param_space(v or {}) for k, v in value.items()}
    return value


class SearchConfig(Strict):
    """A cleaning sweep: the model to clean, the data, the objective and the spaces (search_spaces/*.yaml)."""

    name: str | None = Field(None, description="Sweep name (CLI --name wins); None = the YAML file's stem.")
    description: str = Field("", description="What this space is for (paper appendix entry, model).")
    model: StartModelSpec
    data: DataSpec | None = Field(None, description="Cleaning + evaluation data; None only with a preset model.")
    attack: SweepAttackSpec = SweepAttackSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    base: dict[str, Any] = Field(default_factory=dict, description="TrainSpec values for every trial (dotted ok).")
    epochs: int = Field(10, ge=1, le=MAX_STEPS, description="Cleaning epochs per trial (max_t of ASHA); a sweep of 0 "
                        "epochs would clean nothing (`cleansweep evaluate` measures a model).")
    eval_every: float = Field(1.0, gt=0, description="Evaluate (and checkpoint) every this many epochs.")
    space: ParamSpace = Field(default_factory=dict, description="Parameters shared by every method (dotted keys).")
    methods: Annotated[dict[str, dict[str, Any]] | None, BeforeValidator(_method_spaces)] = Field(
        None, description="Label -> parameters only that method has; the label is method.name unless it sets one."
    )
    preselect: PreselectSpec | None = None
    search: SearchAlgoSpec = SearchAlgoSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    address: str | None = Field(None, description="Ray cluster address (CLI --address wins); None = local.")
    # str, not Path: Path folds the `//` of an s3:// or gs:// URI (`runtime.storage`).
    storage_path: str | Path | None = Field(None, description="Where Tune keeps trials: a folder, s3://BUCKET/PREFIX "
                                            "or gs://BUCKET/PREFIX (CLI --storage-path wins).")
    mlflow: MlflowSpec = MlflowSpec()
    seed: Seed = Field(0, description="Seed of the searcher and of every trial.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)

    @model_validator(mode="after")
    def _data_source(self) -> SearchConfig:
        if self.data is None and self.model.preset is None:
            raise ValueError("data is required unless model.preset builds the world (e.g. preset: demo)")
        for key in self.base:
            if key.split(".")[0] in ("epochs", "eval_every", "asr_threshold", "seed", "data", "attack", "constraint",
                                     "proxy"):
                raise ValueError(f"base.{key}: set it at the top level of the file (epochs, eval_every, "
                                 "objective.threshold / asr / inversion, seed, data, attack)")
        if self.methods is not None and not self.methods:
            raise ValueError("methods: give at least one method, or leave the key out")
        return self
