"""Search-space YAML -> validated `SearchConfig`, method variants, grid points and per-trial `TrainSpec`s.

Pure functions: nothing here imports Ray or Optuna. `DefineByRun` turns the `Domain`s into Optuna suggestions
(`search.py` hands it to Tune's OptunaSearch); this module owns everything that can be checked before a cluster
starts:

- every dotted key (`optim.lr`, `method.ssl_weight`, `epochs`) names a real `TrainSpec` field, and a `method.*` key
  a field of the method it is searched with (each method's Spec has only its own fields);
- every candidate value (all grid/choice values, both ends of a range) makes a valid `TrainSpec` together with the
  base values, so a bad value is a one-line error now, not a failed trial in an hour;
- the algorithm fits the space (Ray's OptunaSearch refuses grid-search parameters,
  ray/tune/search/optuna/optuna_search.py; `grid` needs every domain a grid).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cleansweep.config import DataSpec, deep_update, read_yaml, validate
from cleansweep.errors import UserError
from cleansweep.methods import DEFAULT_METHOD, list_methods, spec_class
from cleansweep.sweep.config import Domain, SearchConfig
from cleansweep.train_config import TrainSpec

VARIANT_KEY = "variant"  # trial-config key naming the method variant (a label of `methods:`); not a TrainSpec field
METHOD_KEY = "method.name"
PLACEHOLDER_DATA = {"train_csv": "clean.csv", "eval_dir": "eval"}  # stands in for preset data during validation
PLACEHOLDER_PROXY = "inversion.safetensors"  # stands in for the scan a proxy-ASR sweep runs first


def load(path: Path, known_methods: Collection[str] | None = None) -> SearchConfig:
    """Read and fully check a space YAML; any problem is a one-line `UserError` naming the key.

    Args:
        path: The YAML file.
        known_methods: Method names the file may use; None = every registered one (`cleansweep.methods`).
    """
    path = Path(path)
    cfg = validate(SearchConfig, read_yaml(path), str(path))
    check(cfg, str(path), known_methods)
    return cfg


def check(cfg: SearchConfig, source: str, known_methods: Collection[str] | None = None) -> None:
    """Cross-field checks of a `SearchConfig` (keys exist, values valid, algorithm fits the space)."""
    _check_methods(cfg, source, list_methods() if known_methods is None else known_methods)
    check_grid_size(cfg, source)
    for label, params in variants(cfg).items():
        where = f"methods.{label}" if cfg.methods else "space"
        named = _method_names(cfg, params)
        for key in params:
            _check_key(key, f"{source}: {where}.{key}", named)
        if cfg.search.algorithm == "grid":
            bad = [k for k, d in params.items() if isinstance(d, Domain) and d.kind != "grid"]
            if bad:
                raise UserError(f"{source}: {where}.{bad[0]}: search.algorithm 'grid' needs grid domains; "
                                "write {grid: [...]} or choose algorithm optuna/random")
        else:
            bad = [k for k, d in params.items() if isinstance(d, Domain) and d.kind == "grid"]
            if bad:
                raise UserError(f"{source}: {where}.{bad[0]}: grid is not supported by search.algorithm "
                                f"'{cfg.search.algorithm}' (Tune's OptunaSearch); use choice, or algorithm grid")
        _check_values(cfg, params, f"{source}: {where}")
    if cfg.preselect is not None:
        method = _preselect_method(cfg, source)
        for key, dom in cfg.preselect.space.items():
            _check_key(key, f"{source}: preselect.space.{key}", [method])
            if isinstance(dom, Domain) and dom.kind != "grid":
                raise UserError(f"{source}: preselect.space.{key}: the preselection stage is a grid; "
                                "write {grid: [...]}")
        _check_values(cfg, dict(cfg.preselect.space), f"{source}: preselect.space")


def variants(cfg: SearchConfig) -> dict[str, dict[str, Any]]:
    """Method label -> all its parameters (shared `space` plus its own), `method.name` set when known.

    Without `methods:` there is one variant, labelled by the base method (`contrastive` by default).
    """
    if not cfg.methods:
        return {_base_method(cfg) or DEFAULT_METHOD: dict(cfg.space)}
    out = {}
    for label, own in cfg.methods.items():
        params = {**cfg.space, **own}
        params.setdefault(METHOD_KEY, label)
        out[label] = params
    return out


class DefineByRun:
    """An Optuna define-by-run space (`space=DefineByRun(variants(cfg))`): pick a method variant, then suggest only
    that variant's parameters; fixed values are returned as they are. Picklable (Tune snapshots the searcher).

    Duck-typed on Optuna's `Trial` (`suggest_categorical`, `suggest_float`), so this module needs no Optuna import.
    """

    def __init__(self, variant_params: Mapping[str, Mapping[str, Any]]):
        self.variants = {label: dict(params) for label, params in variant_params.items()}

    def __call__(self, trial: Any) -> dict[str, Any]:
        labels = list(self.variants)
        label = trial.suggest_categorical(VARIANT_KEY, labels) if len(labels) > 1 else labels[0]
        fixed: dict[str, Any] = {VARIANT_KEY: label}
        for key, dom in self.variants[label].items():
            if not isinstance(dom, Domain):
                fixed[key] = dom
            elif dom.kind == "choice":
                trial.suggest_categorical(key, dom.choice)
            elif dom.kind == "uniform":
                trial.suggest_float(key, *dom.uniform)
            elif dom.kind == "loguniform":
                trial.suggest_float(key, *dom.loguniform, log=True)
            else:  # `check` rejects grids for optuna/random; guard anyway
                raise UserError(f"{key}: grid is not supported by Optuna; use search.algorithm grid")
        return fixed


def expand_grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of grid domains (in file order, duplicates kept, as the paper counts); fixed values copied.

    Raises:
        UserError: a non-grid domain is present (sampling belongs to Tune/Optuna).
    """
    axes = []
    for key, dom in params.items():
        if isinstance(dom, Domain):
            if dom.kind != "grid":
                raise UserError(f"{key}: only grid domains expand to points; got {dom.kind}")
            axes.append([(key, v) for v in dom.grid])
        else:
            axes.append([(key, dom)])
    return [dict(combo) for combo in itertools.product(*axes)]


def grid_size(params: dict[str, Any]) -> int:
    """Points `expand_grid(params)` would make, counted without making them (non-grid domains count as 1)."""
    return math.prod(len(d.grid) for d in params.values() if isinstance(d, Domain) and d.kind == "grid")


def grid_sizes(cfg: SearchConfig) -> dict[str, int]:
    """Grid points per stage, counted before anything is expanded: `preselect`, and `main` (0 unless a grid sweep)."""
    main = sum(grid_size(p) for p in variants(cfg).values()) if cfg.search.algorithm == "grid" else 0
    pre = grid_size(dict(cfg.preselect.space)) if cfg.preselect is not None else 0
    return {"preselect": pre, "main": main}


def check_grid_size(cfg: SearchConfig, source: str = "search space") -> None:
    """Refuse a grid of more trials than `search.max_grid_points` before it is expanded (memory grows with it)."""
    limit = cfg.search.max_grid_points
    for stage, points in grid_sizes(cfg).items():
        trials = points * (cfg.search.num_samples or 1) if stage == "main" else points
        if trials > limit:
            where = "preselect.space" if stage == "preselect" else "the grid"
            raise UserError(f"{source}: {where} makes {trials:,} trials, more than search.max_grid_points "
                            f"({limit:,}); shrink the grid, or raise search.max_grid_points in the YAML to run it")


def grid_points(cfg: SearchConfig) -> list[dict[str, Any]]:
    """Every point of a grid sweep: the union over method variants, each tagged with its variant label."""
    check_grid_size(cfg)
    return [{VARIANT_KEY: label, **p} for label, params in variants(cfg).items() for p in expand_grid(params)]


def preselect_points(cfg: SearchConfig) -> list[dict[str, Any]]:
    """Points of the two-stage preselection (perturbed models, evaluated with epochs=0)."""
    if cfg.preselect is None:
        return []
    check_grid_size(cfg)
    method = _preselect_method(cfg, "search space")
    return [{VARIANT_KEY: "preselect", METHOD_KEY: method, "epochs": 0, **p}
            for p in expand_grid(dict(cfg.preselect.space))]


def base_train_dict(cfg: SearchConfig, *, data: DataSpec | None = None, init: Path | None = None,
                    model_name: str | None = None, defaults: dict[str, Any] | None = None,
                    proxy: Path | None = None, attack: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested TrainSpec values every trial starts from (before its sampled parameters).

    Args:
        cfg: The sweep.
        data: Resolved data (a preset's world); default `cfg.data`.
        init: Resolved starting checkpoint; default `cfg.model.checkpoint`.
        model_name: Resolved model config name; default `cfg.model.name`, else TrainSpec's default.
        defaults: A preset's cleaning TrainSpec dict, layered under everything the file sets.
        proxy: The inverted trigger of a proxy-ASR sweep (`start_model` scans when the file names none).
        attack: The resolved trigger (`start_model`: the card's or manifest's, the file's fields on top); default:
            only the fields the file writes.
    """
    data = data or cfg.data
    defaults = defaults or {}
    out: dict[str, Any] = deep_update(defaults, cfg.base)
    model = {"init": str(init or cfg.model.checkpoint)} if (init or cfg.model.checkpoint) else {}
    if model_name or cfg.model.name:
        model["name"] = model_name or cfg.model.name
    out = deep_update(out, {"model": model})
    attack = attack if attack is not None else cfg.attack.written()  # only what the file sets beats a preset
    fixed = {
        "data": data.model_dump(mode="json", exclude_unset=True) if data is not None else dict(PLACEHOLDER_DATA),
        "attack": attack,
        "epochs": cfg.epochs,
        "eval_every": cfg.eval_every,
        "asr_threshold": cfg.objective.threshold,
        "constraint": cfg.objective.constraint,
        "seed": cfg.seed,
    }
    proxy = proxy or cfg.objective.inversion
    if proxy is not None:
        fixed["proxy"] = str(proxy)
    elif cfg.objective.constraint == "proxy_asr_top1":
        fixed["proxy"] = PLACEHOLDER_PROXY  # validation before the scan; `start_model` puts the real file here
    return deep_update(out, fixed)


def trial_spec(base: dict[str, Any], params: dict[str, Any], source: str = "trial") -> TrainSpec:
    """Base values + one trial's sampled parameters (dotted keys) -> a validated `TrainSpec`."""
    values = {k: v for k, v in params.items() if k != VARIANT_KEY}
    return validate(TrainSpec, deep_update(base, values), source)


def count_trials(cfg: SearchConfig) -> dict[str, int]:
    """Number of configurations per stage (grid: points; otherwise num_samples)."""
    n = cfg.search.num_samples
    sizes = grid_sizes(cfg)
    main = sizes["main"] * (n or 1) if cfg.search.algorithm == "grid" else n or 8
    return {"preselect": sizes["preselect"], "main": main}


def space_summary(cfg: SearchConfig) -> dict[str, str]:
    """Flat, human-readable description of the spaces for MLflow params (`space.optim.lr` -> 'loguniform[...]')."""
    out = {}
    for label, params in variants(cfg).items():
        prefix = f"space.{label}." if cfg.methods else "space."
        for key, dom in params.items():
            out[prefix + key] = _describe(dom)
    if cfg.preselect is not None:
        for key, dom in cfg.preselect.space.items():
            out[f"preselect.{key}"] = _describe(dom)
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _describe(dom: Any) -> str:
    if not isinstance(dom, Domain):
        return str(dom)
    values = getattr(dom, dom.kind)
    return f"{dom.kind}{list(values)}"


def _base_method(cfg: SearchConfig) -> str | None:
    base = deep_update({}, cfg.base)
    return base.get("method", {}).get("name")


def _fixed(value: Any) -> Any:
    return None if isinstance(value, Domain) else value


def _check_methods(cfg: SearchConfig, source: str, known: Collection[str]) -> None:
    named = [("base.method.name", _base_method(cfg))]
    for label, params in variants(cfg).items():
        where = f"methods.{label}" if cfg.methods else "space"
        named += [(f"{where}.{METHOD_KEY}", v) for v in _candidates(params.get(METHOD_KEY))]
    for where, name in named:
        if name is not None and name not in known:
            raise UserError(f"{source}: {where}: unknown method {name!r}; choose from: {', '.join(known)} (or set "
                            f"method.name inside methods.<label>)")


def _method_names(cfg: SearchConfig, params: dict[str, Any]) -> list[str]:
    """The methods one variant's parameters go to: its `method.name` (every candidate), else the base's or default."""
    if METHOD_KEY in params:
        return [str(name) for name in _candidates(params[METHOD_KEY])]
    return [_base_method(cfg) or DEFAULT_METHOD]


def _preselect_method(cfg: SearchConfig, source: str) -> str:
    """The one method of a two-stage sweep; it must be one whose `prepare` changes the starting weights."""
    named = {_fixed(p.get(METHOD_KEY)) for p in variants(cfg).values()} | {_base_method(cfg)}
    perturbing = [m for m in list_methods() if spec_class(m).perturbs_start]
    named -= {None}
    if len(named) != 1 or not spec_class(str(next(iter(named)))).perturbs_start:
        fix = f"; set base: {{method.name: {perturbing[0]}}}" if perturbing else ""
        raise UserError(f"{source}: preselect: the two-stage option is for a method that perturbs the starting "
                        f"weights ({', '.join(perturbing) or 'none is registered'}){fix}")
    return str(next(iter(named)))


def _check_key(key: str, where: str, methods: list[str]) -> None:
    """`key` must be a dotted path to a leaf field of TrainSpec (data/attack/seed/threshold come from the top level);
    a `method.<field>` key a field of every method in `methods`."""
    model: type[BaseModel] = TrainSpec
    parts = key.split(".")
    if parts[0] in ("data", "attack", "asr_threshold", "seed", "constraint", "proxy") or key == "model.init":
        raise UserError(f"{where}: cannot be searched; it is set once for the sweep (top-level {parts[0]})")
    if parts[0] == "method":
        if len(parts) != 2:
            raise UserError(f"{where}: name one field of the method (method.<field>, e.g. method.name)")
        for name in methods:
            if name in list_methods() and parts[1] not in spec_class(name).model_fields:
                own = ", ".join(f"method.{f}" for f in spec_class(name).model_fields)
                raise UserError(f"{where}: not a field of method {name!r} (searched with it); choose from: {own}")
        return
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            choices = ", ".join(sorted(".".join(parts[:i] + [f]) for f in fields))
            raise UserError(f"{where}: not a TrainSpec field; choose from: {choices}")
        annotation = fields[part].annotation
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not nested:
            raise UserError(f"{where}: {'.'.join(parts[:i + 1])} has no sub-fields")
        if i == len(parts) - 1 and nested:
            raise UserError(f"{where}: {key} is a section; name one of its fields ({key}.<field>)")
        if nested:
            model = annotation


def _candidates(dom: Any) -> list[Any]:
    if not isinstance(dom, Domain):
        return [dom]
    if dom.kind in ("uniform", "loguniform"):
        return list(getattr(dom, dom.kind))
    return list(dict.fromkeys(getattr(dom, dom.kind)))


def _check_values(cfg: SearchConfig, params: dict[str, Any], where: str) -> None:
    """Every candidate value of every parameter makes a valid TrainSpec with the base values (one at a time)."""
    base = base_train_dict(cfg)
    first = {k: _candidates(d)[0] for k, d in params.items()}
    trial_spec(base, first, where)
    for key, dom in params.items():
        for value in _candidates(dom)[1:]:
            trial_spec(base, {**first, key: value}, f"{where}.{key}={value!r}")
