"""Typed, validated configuration: one pydantic model per concept, checked once at the edge.

Every model is frozen and rejects unknown keys, so a typo in a YAML file is an error naming the key, never a
silently ignored setting. Inner functions take plain values pulled out of these objects.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleansweep.errors import UserError
from cleansweep.limits import MAX_BATCH, MAX_COUNT, MAX_GRID_POINTS, MAX_IMAGE_SIDE, MAX_STEPS, MAX_WORKERS, SEED_MAX

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
    train_csv: Path = Field(description="Image-caption CSV (paths relative to the CSV) to train or clean on.")
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


class AttackSpec(Strict):
    name: str = Field("badnet", description="Trigger used for ASR evaluation (cleansweep.triggers.TRIGGERS).")
    target: str = Field("banana", description="Target class name of the backdoor.")
    patch_size: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE,
                                   description="BadNet patch side in pixels; None = 16 at 224 px, scaled.")
    location: Literal["random", "fixed"] = Field("random", description="BadNet patch position: random or bottom-right.")
    patch: Literal["fresh", "fixed"] = Field("fresh",
                                             description="BadNet patch values: fresh per image or one per run.")
    trigger_seed: Seed = Field(0, description="Seed of the trigger's per-run parts (a fixed patch, Blended noise, "
                              "WaNet grid): the value the data was poisoned with (its manifest's trigger_params).")
    params: dict[str, Scalar] = Field(default_factory=dict, description="Other parameters of this trigger "
                                      "(cleansweep.triggers.TRIGGERS[name].defaults), e.g. {alpha: 0.2}.")
    seed: Seed = Field(0, description="Seed of the evaluation triggers (same triggered set at every evaluation).")


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


class MethodSpec(Strict):
    name: str = Field("contrastive", description="Training/cleaning method (cleansweep.methods.list_methods()).")
    mmcl_weight: float = Field(1.0, ge=0, description="Weight of the multimodal CLIP loss (eq. 1).")
    ssl_weight: float = Field(0.0, ge=0, description="Weight of the in-modal self-supervised loss (eq. 2).")
    cluster_weight: float = Field(0.0, ge=0, description="Weight of the deep-clustering cross-entropy.")
    num_clusters: int = Field(1000, ge=2, le=MAX_COUNT, description="k of the spherical k-means for deep clustering.")
    cluster_iters: int = Field(20, ge=1, le=MAX_STEPS, description="k-means iterations per epoch.")
    l2_init_weight: float = Field(0.0, ge=0, description="Weight of the L2 pull toward the initial weights.")
    shrink: float = Field(1.0, ge=0, description="Shrink-and-perturb lambda: theta <- lambda*theta + sigma*noise.")
    perturb: float = Field(0.0, ge=0, description="Shrink-and-perturb sigma (scale of the noise, see perturb_kind).")
    perturb_kind: Literal["init", "gaussian"] = Field(
        "init", description="Noise of shrink-and-perturb: a fresh random init (the paper's code) or N(0, 1) per weight."
    )
    par_weight: float = Field(
        1.0, ge=0, description="Perturb-and-Recover: weight of the capped push away from the frozen starting model's "
        "image + text embeddings (1.0 = the PAR paper's 0.5 x (image + text) squared L2)."
    )
    par_cap: float = Field(
        1.075, gt=0, le=2, description="Perturb-and-Recover: cap of the per-sample distance 1 - cos(f, f0) beyond "
        "which there is no push; 2 = uncapped (1.075 = the PAR paper's tau 2.15 on squared L2)."
    )

    @model_validator(mode="after")
    def _some_loss(self) -> MethodSpec:
        if self.mmcl_weight == 0 and self.ssl_weight == 0 and self.cluster_weight == 0:
            raise ValueError("all loss weights are 0; set mmcl_weight, ssl_weight or cluster_weight > 0")
        return self


class OptimSpec(Strict):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norm/bias/logit_scale).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(50, ge=0, le=MAX_COUNT, description="Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class TrainSpec(Strict):
    """One training run: pre-training, or one cleaning trial."""

    model: ModelSpec = ModelSpec()
    data: DataSpec
    attack: AttackSpec = AttackSpec()
    method: MethodSpec = MethodSpec()
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


class RaySpec(Strict):
    address: str | None = Field(None, description="Existing Ray cluster address; None starts a local one.")
    num_workers: int = Field(1, ge=0, le=MAX_WORKERS, description="Ray Train workers (0 = run in the driver process).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_WORKERS, description="CPUs reserved per worker.")


class MlflowSpec(Strict):
    tracking_uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI or sqlite in the working dir.")
    experiment: str = Field("cleansweep", description="MLflow experiment name.")


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

    @model_validator(mode="after")
    def _reference(self) -> PretrainConfig:
        if self.selection == "closest_top1" and self.reference_top1 is None:
            raise ValueError("selection 'closest_top1' needs reference_top1 (e.g. 0.2376)")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)


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


# ------------------------------------------------------------------------------------------ search (sweeps)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(value: Any) -> Any:
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
        values = [_number(x) for x in v] if isinstance(v, list) else v
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
            # Tune accepts tune.uniform(1, 0) silently (reliability notes): reject it here.
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{k}: low {bounds[0]} must be < high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low {self.loguniform[0]} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None)


def _param_space(value: Any) -> dict[str, Domain | Scalar]:
    """Dotted key -> fixed value or Domain, with one clean message naming the bad key."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of dotted keys (optim.lr, method.name, ...), got {type(value).__name__}")
    out: dict[str, Domain | Scalar] = {}
    for key, v in value.items():
        if isinstance(v, Domain | bool | int | float | str):
            out[str(key)] = _number(v)
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
    checkpoint: Path | None = Field(None, description="Pre-trained checkpoint to clean (its JSON card beside it).")
    preset: Literal["demo"] | None = Field(None, description="Build (or reuse the cached) pre-trained preset model.")
    objective: Literal["mmcl", "mmcl+ssl"] = Field("mmcl", description="Pre-training objective of the preset.")
    name: str | None = Field(None, description="Model config name; None = from the checkpoint's card.")

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
    storage_path: Path | None = Field(None, description="Where Tune keeps trials (CLI --storage-path wins).")
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
