"""One training run's configuration: `TrainSpec` (pre-training or one cleaning trial) and `PretrainConfig`.

It sits above `cleansweep.methods` because `TrainSpec.method` is the union of the registered methods' Specs (each
method module defines its own); the sections it is made of are `cleansweep.config`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cleansweep.config import AttackSpec, DataSpec, MlflowSpec, ModelSpec, OptimSpec, RaySpec, Seed, Strict, check_name
from cleansweep.limits import MAX_STEPS
from cleansweep.methods import MethodSpec, method_spec
from cleansweep.runtime import storage


class TrainSpec(Strict):
    """One training run: pre-training, or one cleaning trial."""

    model: ModelSpec = ModelSpec()
    data: DataSpec
    attack: AttackSpec = AttackSpec()
    method: MethodSpec = Field(method_spec({}), description="Training/cleaning method: `name` picks one of "
                               "cleansweep.methods.list_methods() (default contrastive); the other keys are its own.")
    optim: OptimSpec = OptimSpec()
    epochs: int = Field(10, ge=0, le=MAX_STEPS, description="Training epochs (0 = prepare + evaluate only).")
    eval_every: float = Field(1.0, gt=0, description="Evaluate every this many epochs (1/3 = the short paper).")
    eval_at_start: bool = Field(True, description="Evaluate before the first step (the starting model).")
    asr_threshold: float = Field(0.05, ge=0, le=1, description="An evaluation is feasible when asr_top1 <= this.")
    constraint: Literal["asr_top1", "proxy_asr_top1"] = Field(
        "asr_top1", description="The ASR feasibility is judged on (proxy_asr_top1 needs `proxy`).")
    proxy: Path | None = Field(None, description="Inverted trigger (`cleansweep scan`'s inversion.safetensors): every "
                               "evaluation also reports proxy_asr_top1, the share of non-target images it sends to "
                               "the suspected target.")
    seed: Seed = Field(0, description="Seed of initialisation, data order and augmentations.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    amp: bool = Field(True, description="Mixed precision (bf16 autocast) on GPU; ignored on CPU.")
    logit_scale_max: float = Field(4.6052, gt=0, description="Clamp logit_scale to [0, this] (ln 100, as CLIP).")

    @model_validator(mode="after")
    def _proxy_given(self) -> TrainSpec:
        if self.constraint == "proxy_asr_top1" and self.proxy is None:
            raise ValueError("constraint proxy_asr_top1 needs proxy: the inversion.safetensors of `cleansweep scan`")
        return self


class PretrainConfig(Strict):
    name: str = Field(description="Run name (also the storage folder and the MLflow run name).")
    train: TrainSpec
    ray: RaySpec = RaySpec()
    mlflow: MlflowSpec = MlflowSpec(experiment="cleansweep-pretrain")
    keep_checkpoints: int = Field(3, ge=1, le=MAX_STEPS, description="Checkpoints kept besides the selected one.")
    selection: Literal["best_top1", "closest_top1", "last"] = Field(
        "best_top1", description="Which evaluation's model to hand to cleaning (the paper's rules)."
    )
    reference_top1: float | None = Field(None, ge=0, le=1, description="Target accuracy for closest_top1.")
    # str, not Path: Path folds the `//` of an s3:// or gs:// URI (`runtime.storage`).
    storage_path: str | Path | None = Field(
        None, description="Where run NAME lives (checkpoints, candidate/, selected/): a folder, s3://BUCKET/PREFIX or "
        "gs://BUCKET/PREFIX; None = <workdir>/pretrain.")

    @model_validator(mode="after")
    def _reference(self) -> PretrainConfig:
        if self.selection == "closest_top1" and self.reference_top1 is None:
            raise ValueError("selection 'closest_top1' needs reference_top1 (e.g. 0.2376)")
        return self

    @model_validator(mode="after")
    def _remote_needs_workers(self) -> PretrainConfig:
        if storage.is_remote(self.storage_path) and self.ray.num_workers == 0:
            # In-process runs keep their own checkpoints with local folder operations (`pretrain.worker`).
            raise ValueError(f"storage_path {self.storage_path} needs Ray Train workers: use --num-workers 1 or more, "
                             "or a local --storage-path for an in-process run (--num-workers 0)")
        return self

    @field_validator("storage_path", mode="before")
    @classmethod
    def _location(cls, v: str | Path | None) -> str | Path | None:
        return storage.location_value(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)
