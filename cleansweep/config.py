"""Typed, validated configuration: one pydantic model per concept, checked once at the edge.

The sections of a run (model, data, attack, optimizer, Ray, MLflow) live here; `cleansweep.train_config` puts them
together with a method's Spec (`cleansweep.methods`) into `TrainSpec` and `PretrainConfig`.

Every model is frozen and rejects unknown keys, so a typo in a YAML file is an error naming the key, never a
silently ignored setting. Inner functions take plain values pulled out of these objects.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleansweep.errors import UserError
from cleansweep.limits import MAX_BATCH, MAX_COUNT, MAX_IMAGE_SIDE, MAX_WORKERS, SEED_MAX

Scalar = bool | int | float | str
# A seed numpy, Optuna's samplers and torch all accept: a negative one used to fail only once Ray had started.
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in a YAML pass gt/ge bounds (inf > 0) and reach an optimiser or a sampler.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSpec(Strict):
    name: str = Field("tiny-rn", description="Model configuration name (cleansweep.models.list_models()).")
    init: Path | None = Field(None, description="Checkpoint to start from (.safetensors or .pt); None = random init.")


class DataSpec(Strict):
    train_csv: Path | None = Field(None, description="Image-caption CSV (paths relative to the CSV) to train or clean "
                                   "on; or train_shards.")
    train_shards: str | None = Field(None, description="WebDataset shards to train or clean on, a brace pattern "
                                     "DIR/{00000..00099}.tar (KEY.jpg|png|webp + KEY.txt); or train_csv.")
    train_num_samples: int | None = Field(None, ge=1, le=MAX_COUNT**2, description="Pairs per epoch with "
                                          "train_shards (None = every pair once, from sizes.json or the tars).")
    image_key: str = Field("image", description="CSV column holding image paths.")
    caption_key: str = Field("caption", description="CSV column holding captions.")
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="Missing/corrupt image: skip and count it, or fail naming the row."
    )
    eval_dir: Path = Field(description="ImageNet-style evaluation folder (one subfolder per class).")
    eval_subset: int | None = Field(None, ge=1, le=MAX_COUNT,
                                    description="Evaluate on a fixed seeded subset of this many images.")
    batch_size: int = Field(128, ge=2, le=MAX_BATCH, description="Global training batch size (split across workers).")
    eval_batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="Evaluation batch size.")
    workers: int = Field(0, ge=0, le=MAX_WORKERS, description="DataLoader worker processes per training process.")

    @model_validator(mode="after")
    def _one_train_source(self) -> DataSpec:
        if (self.train_csv is None) == (self.train_shards is None):
            raise ValueError("give exactly one of train_csv (an image-caption CSV) or train_shards (a WebDataset "
                             "brace pattern DIR/{00000..00099}.tar)")
        if self.train_num_samples is not None and self.train_shards is None:
            raise ValueError("train_num_samples sets the epoch of train_shards; a CSV's epoch is its rows")
        return self

    @property
    def train_source(self) -> str:
        """The training data as written: the CSV path or the shard pattern."""
        return str(self.train_csv if self.train_csv is not None else self.train_shards)


class AttackSpec(Strict):
    name: str = Field("badnet", description="Trigger used for ASR evaluation (cleansweep.attacks.registry.TRIGGERS).")
    target: str = Field("banana", description="Target class name of the backdoor.")
    patch_size: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE,
                                   description="BadNet patch side in pixels; None = 16 at 224 px, scaled.")
    location: Literal["random", "fixed"] = Field("random", description="BadNet patch position: random or bottom-right.")
    patch: Literal["fresh", "fixed"] = Field("fresh",
                                             description="BadNet patch values: fresh per image or one per run.")
    trigger_seed: Seed = Field(0, description="Seed of the trigger's per-run parts (a fixed patch, Blended noise, "
                              "WaNet grid): the value the data was poisoned with (its manifest's trigger_params).")
    params: dict[str, Scalar] = Field(default_factory=dict, description="Other parameters of this trigger "
                                      "(cleansweep.attacks.registry.TRIGGERS[name].defaults), e.g. {alpha: 0.2}.")
    seed: Seed = Field(0, description="Seed of the evaluation triggers (same triggered set at every evaluation).")


class OptimSpec(Strict):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norm/bias/logit_scale).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(50, ge=0, le=MAX_COUNT, description="Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class RaySpec(Strict):
    address: str | None = Field(None, description="Existing Ray cluster address; None starts a local one.")
    num_workers: int = Field(1, ge=0, le=MAX_WORKERS, description="Ray Train workers (0 = run in the driver process).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_WORKERS, description="CPUs reserved per worker.")


class MlflowSpec(Strict):
    tracking_uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI or sqlite in the working dir.")
    experiment: str = Field("cleansweep", description="MLflow experiment name.")


# A searched parameter lives here, below every config that holds one; Tune state of sweeps saved before the
# package moved pickled it as `cleansweep.config.Domain`.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def number_or_text(value: Any) -> Any:
    """'1e-5' -> 1e-05: YAML 1.1 reads exponents without a dot as strings, but users (and the paper) write them."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value) if any(c in value for c in ".eE") else int(value)
    return value


class Domain(Strict):
    """One searched parameter in Tune's own words: exactly one of choice, uniform, loguniform, grid."""

    choice: list[Scalar] | None = Field(None, min_length=1, description="Sample one of these values.")
    uniform: tuple[float, float] | None = Field(None, description="Sample uniformly from [low, high).")
    loguniform: tuple[float, float] | None = Field(None, description="Sample log-uniformly; 0 < low < high.")
    grid: list[Scalar] | None = Field(None, min_length=1, description="Try every value (duplicates kept).")

    @field_validator("choice", "grid", mode="before")
    @classmethod
    def _numbers(cls, v: Any) -> Any:
        values = [number_or_text(x) for x in v] if isinstance(v, list) else v
        if isinstance(values, list) and any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ValueError("every value must be finite (no .inf or .nan)")
        return values

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        kinds = [k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, grid")
        for k in ("uniform", "loguniform"):
            bounds = getattr(self, k)
            # Tune's `tune.uniform(1, 0)` builds a domain without complaint (ray/tune/search/sample.py): reject it here.
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{k}: low {bounds[0]} must be < high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low {self.loguniform[0]} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None)



def check_name(name: str) -> str:
    """Run and sweep names become folder names and MLflow run names: keep them to a safe alphabet."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name):
        raise ValueError(f"name {name!r} must be 1-100 characters of letters, digits, '_', '.', '-'")
    return name


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first bad key and what is wrong with it."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against the documented keys"
    elif first["type"] == "missing":
        msg = "required key missing; add it (search_spaces/demo.yaml and docs/interfaces.md show every key)"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then an explicit key is an override, not a duplicate
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r}, first given at line {first_line[key]}",
                        problem_mark=key_node.start_mark)
                first_line[key] = line
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's problem without long quoted fragments of the file (a file's contents are never echoed)."""
    problem = str(getattr(err, "problem", None) or type(err).__name__)
    return re.sub(r"'[^']{17,}'|\"[^\"]{17,}\"", "'...'", problem)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every problem into a one-line UserError (duplicate keys included)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass the path of an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__)
        raise UserError(f"{path}: cannot read it ({reason}); pass a YAML text file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {_yaml_problem(e)}; fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def validate(model: type[Strict], data: dict[str, Any], source: str) -> Any:
    """Validate `data` against `model`, or raise a one-line UserError naming the bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; values in `overrides` win (dotted keys like 'optim.lr' are expanded)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = deep_update(out[head], value)
        else:
            out[head] = value
    return out
