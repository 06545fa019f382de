"""A `PretrainConfig` from what `cleansweep pretrain` is given: a preset, a YAML file, flags and `--set` items.

Later sources win: the preset's settings, then the YAML, then the flags (dotted keys), then `--set KEY=VALUE`.
Every value is checked before anything is written: with `--preset demo` the config is first built on the paths the
demo data will have, and the data is made only once that config is valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cleansweep.config import deep_update, read_yaml, validate
from cleansweep.errors import UserError
from cleansweep.runtime import layout
from cleansweep.train_config import PretrainConfig


def pretrain_config(workdir: Path, *, preset: str | None = None, objective: str | None = None,
                    config_file: Path | None = None, flags: Mapping[str, Any] | None = None,
                    sets: Sequence[str] = ()) -> PretrainConfig:
    """The validated pre-training config, building the demo data first when `preset` is "demo".

    Args:
        workdir: Where the demo preset keeps its data.
        preset: demo, cc3m or cc6m (`experiments.presets`), or None for a config from the YAML and flags alone.
        objective: mmcl or mmcl+ssl (sets the loss weights; the preset's run name and settings follow it).
        config_file: A PretrainConfig YAML.
        flags: Dotted PretrainConfig keys (`train.optim.lr`) -> values; None values are not given.
        sets: `KEY=VALUE` items (YAML values), applied last.

    Raises:
        UserError: one line naming the bad key, value or missing input, before any data is written.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if preset == "demo":
        from cleansweep.experiments import presets

        dirs = layout.demo_data_dirs(workdir, presets.get_preset("demo")["poison"]["attack"])
        future = {"train_csv": str(dirs["poisoned"] / "train.csv"), "eval_dir": str(dirs["world"])}
        _config_on(future, preset, objective, config_file, given, sets, check_paths=False)
        paths = presets.prepare_demo_data(workdir, seed=given.get("train.seed") or 0)
        return _config_on(paths, preset, objective, config_file, given, sets)
    paths = {"train_csv": given.get("train.data.train_csv"), "eval_dir": given.get("train.data.eval_dir"),
             "init": given.get("train.model.init")}
    return _config_on(paths, preset, objective, config_file, given, sets)


def _config_on(paths: Mapping[str, Any], preset: str | None, objective: str | None, config_file: Path | None,
               flags: Mapping[str, Any], sets: Sequence[str], *, check_paths: bool = True) -> PretrainConfig:
    """The config with the preset's data at `paths`; `check_paths=False` for paths that do not exist yet."""
    data: dict = {}
    if preset:
        from cleansweep.experiments import presets

        presets.get_preset(preset)  # unknown name -> one-line error
        objective_or_default = objective or "mmcl"
        data = {"name": layout.preset_run_name(preset, objective_or_default),
                "train": presets.pretrain_spec(preset, objective_or_default, dict(paths), check_paths=check_paths)}
    if config_file is not None:
        data = deep_update(data, read_yaml(config_file))
    dotted = dict(flags)
    if objective:
        dotted |= {f"train.method.{k}": v for k, v in layout.objective_weights(objective).items()}
    data = deep_update(data, nest({k: str(v) if isinstance(v, Path) else v for k, v in dotted.items()}))
    data = deep_update(data, nest(parse_sets(sets)))
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    tdata = train.get("data") if isinstance(train.get("data"), dict) else {}
    if "train_csv" not in tdata and "train_shards" not in tdata:
        raise UserError("no train.data.train_csv given; pass --train-csv CSV, a CONFIG.yaml that sets it (or "
                        "train.data.train_shards), or --preset demo")
    if "eval_dir" not in tdata:
        raise UserError("no train.data.eval_dir given; pass --eval-data FOLDER, a CONFIG.yaml that sets it, or "
                        "--preset demo")
    if "name" not in data:
        raise UserError("no run name given; pass --name NAME (or set name: in the YAML)")
    return validate(PretrainConfig, data, str(config_file) if config_file else "pretrain flags")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`["train.optim.lr=0.001", ...]` -> `{"train.optim.lr": 0.001}` (values read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not KEY=VALUE; write e.g. --set train.optim.lr=0.001")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'train.optim.lr': 1} -> {'train': {'optim': {'lr': 1}}} (`config.deep_update` expands one level only)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *heads, last = key.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {head} is set both as a value and as a section; set one of them")
        node[last] = value
    return out
