"""The model a sweep cleans, resolved before any cluster starts: a checkpoint (+ its card) or a preset's model.

`resolve` is what the CLI and the study call before `driver.search`: it builds (or reuses) a preset's pre-trained
poisoned model through the pre-training driver, reads the checkpoint's card, assembles the values every trial
starts from (`base`), checks them without training (`fit.preflight`: a bad model, CSV, folder, target class or
trigger is a one-line error before Ray starts) and measures the starting model once, unless its card already holds
numbers measured the way the trials measure. So `search` and `pretrain` stand side by side: neither imports the
other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleansweep.config import AttackSpec, DataSpec, validate
from cleansweep.errors import UserError
from cleansweep.objective import ASR, PROXY_ASR, TOP1
from cleansweep.runtime import layout, storage
from cleansweep.sweep import space
from cleansweep.sweep.config import SearchConfig
from cleansweep.train_config import PretrainConfig, TrainSpec


@dataclass(frozen=True)
class StartModel:
    """The model to clean and what every trial of its sweep starts from.

    Attributes:
        init: Absolute path of the checkpoint (`model.init` of every trial).
        model_name: Model config name (from the sweep, else the card).
        card: The checkpoint's JSON card ({} without one).
        base: Nested TrainSpec values of every trial before its sampled parameters (absolute paths).
        metrics: `zeroshot_top1` and `asr_top1` of the starting model, measured like the trials measure.
        source: Where the metrics come from ("card" or "evaluated").
        attack_source: Where the trigger comes from (`evaluate.resolve_attack`: "card", "manifest", "card+file", ...).
        warning: Set when the starting model already meets the ASR constraint (names the trigger used).
    """

    init: Path
    model_name: str | None
    card: dict[str, Any]
    base: dict[str, Any]
    metrics: dict[str, float]
    source: str
    attack_source: str = "file"
    warning: str | None = None

    def tracking_params(self) -> dict[str, str]:
        """What the sweep's parent run records about its start: the trigger, where it came from, any warning."""
        from cleansweep.evaluate import describe_trigger

        out = {"start_trigger": describe_trigger(self.base["attack"]), "start_trigger_source": self.attack_source}
        return {**out, "start_warning": self.warning} if self.warning else out


def resolve(cfg: SearchConfig, workdir: Path, *, echo: Callable[[str], None] = print) -> StartModel:
    """The sweep's starting model, checked and measured (see the module docstring).

    Raises:
        UserError: a missing checkpoint or data path, non-finite weights, a model name or trigger that contradicts
            the checkpoint's card, or anything `fit.preflight` finds.
    """
    from cleansweep.models import checkpoint_model_name, load_state_dict_file, read_card

    data, defaults = cfg.data, {}
    if cfg.model.preset is not None:
        init, paths = build_preset_model(cfg.model.preset, cfg.model.objective, Path(workdir), echo)
        from cleansweep.experiments import presets

        defaults = presets.clean_spec(cfg.model.preset, paths, init)
        defaults.pop("model", None)
        if data is None:
            data = DataSpec(train_csv=paths["clean_csv"], eval_dir=paths["eval_dir"])
    else:
        init = start_checkpoint(cfg.model.checkpoint, Path(workdir), echo)
    card = read_card(init)
    # The starting weights are read once here: a non-finite or unrecognisable model is refused before anything runs.
    model_name = checkpoint_model_name(init, cfg.model.name, load_state_dict_file(init), model_flag="model.name")
    attack, attack_source = sweep_attack(cfg, card, init, model_name)
    data = _absolute(data)
    proxy = proxy_inversion(cfg, init, data, model_name, Path(workdir), echo)
    base = space.base_train_dict(cfg, data=data, init=init.resolve(), model_name=model_name, defaults=defaults,
                                 proxy=proxy, attack=attack)
    _check_paths(base)
    spec = start_eval_spec(base)
    from cleansweep import fit

    fit.preflight(space.trial_spec(base, {}, "sweep base"))
    metrics, source = card_metrics(card, base), "card"
    if metrics is None:
        echo("evaluating the starting model once (its card has no numbers measured like the trials')")
        metrics, source = evaluate_start(spec), "evaluated"
    warning = already_clean_warning(metrics, base, attack_source)  # printed by the sweep once nothing can refuse it
    return StartModel(init=init.resolve(), model_name=model_name, card=card, base=base, metrics=metrics,
                      source=source, attack_source=attack_source, warning=warning)


def start_checkpoint(checkpoint: storage.Location, workdir: Path, echo: Callable[[str], None] = print) -> Path:
    """The local weights file of `model.checkpoint`: the file itself, or for an s3:// / gs:// URI a copy.

    A URI names the weights object or the folder holding `model.safetensors` (a pre-training run's `selected/`); the
    weights and their card (the .json beside them) are downloaded to `<workdir>/checkpoints/<hash of the URI>/`
    (`layout.fetched_checkpoint_dir`), where the loaders read them as any local checkpoint (safetensors, never
    unpickled code). Trials read that copy: on several nodes it must be where each node sees it, like the data.

    Raises:
        UserError: a missing file or object, or object storage that cannot be used (`storage.check_storage`).
    """
    if not storage.is_remote(checkpoint):
        init = Path(checkpoint).resolve()
        if not init.is_file():
            raise UserError(f"model.checkpoint {init} not found; pass the pre-trained .safetensors (or .pt) file")
        return init
    uri = str(checkpoint)
    storage.check_storage(uri)
    folder = layout.fetched_checkpoint_dir(workdir, uri)
    echo(f"model.checkpoint: copying {uri} to {folder}")
    return storage.fetch_checkpoint(uri, folder, layout.MODEL_FILE, "model.checkpoint")


def sweep_attack(cfg: SearchConfig, card: Mapping[str, Any], init: Path, model_name: str) -> tuple[dict[str, Any],
                                                                                                   str]:
    """The trigger the sweep measures ASR with, and where it comes from: `evaluate.resolve_attack`'s rule (the card's
    or `attack.manifest`'s trigger, the fields the file writes on top; a contradiction is refused unless
    `attack.override: true`), the same rule `cleansweep evaluate` follows."""
    from cleansweep.evaluate import read_manifest, resolve_attack
    from cleansweep.models import model_image_size

    manifest = read_manifest(Path(cfg.attack.manifest).resolve()) if cfg.attack.manifest is not None else None
    spec, source = resolve_attack(card, manifest, cfg.attack.written(), f"model.checkpoint {init}", words="file",
                                  image_size=None if cfg.attack.override else model_image_size(model_name))
    return spec.model_dump(mode="json"), source


def already_clean_warning(metrics: Mapping[str, float], base: Mapping[str, Any], attack_source: str) -> str | None:
    """A loud line when the starting model already meets the constraint: every trial would look clean, which is
    what a sweep measuring the wrong trigger looks like (the issue this guards against: ASR 0.0 for a 0.79 model)."""
    from cleansweep.evaluate import NO_ATTACK, describe_trigger

    constraint, threshold = base.get("constraint", ASR), float(base.get("asr_threshold", 0.05))
    value = metrics.get(constraint)
    if value is None or not math.isfinite(value) or value > threshold:
        return None
    trigger = "the inverted trigger of `cleansweep scan`" if constraint == PROXY_ASR or base["attack"].get(
        "name") == NO_ATTACK else f"trigger {describe_trigger(base['attack'])} (from the {attack_source})"
    return (f"WARNING: the starting model already meets the constraint before any cleaning: {constraint} "
            f"{value:.3f} <= threshold {threshold:g}, measured with {trigger}; every trial will look clean. If the "
            "model is poisoned, this is not its trigger: set attack.manifest to its poison manifest or fix attack:")


def proxy_inversion(cfg: SearchConfig, init: Path, data: DataSpec | None, model_name: str | None, workdir: Path,
                    echo: Callable[[str], None]) -> Path | None:
    """The inverted trigger a proxy-ASR sweep constrains on: the YAML's `objective.inversion`, else a scan of the
    starting model on the sweep's evaluation folder (`cleansweep scan`, cached per checkpoint and folder)."""
    if cfg.objective.constraint != PROXY_ASR:
        return None
    if cfg.objective.inversion is not None:
        path = Path(cfg.objective.inversion).resolve()
        if not path.is_file():
            raise UserError(f"objective.inversion {path} not found; pass the inversion.safetensors of `cleansweep "
                            "scan`, or drop the key to scan the starting model first")
        return path
    from cleansweep.detect import scan
    from cleansweep.models import file_sha256

    eval_dir = Path(data.eval_dir) if data is not None else None
    if eval_dir is None or not eval_dir.is_dir():
        raise UserError(f"objective.asr proxy: no evaluation folder to scan the model on ({eval_dir}); set "
                        "data.eval_dir")
    out = layout.scan_dir(workdir, file_sha256(init), str(eval_dir))
    inversion = out / layout.INVERSION_FILE
    if not inversion.is_file():
        echo(f"proxy ASR: scanning the starting model for a trigger (DECREE inversion; cached in {out})")
        scan.scan_checkpoint(init, eval_dir, out_dir=out, model_name=model_name)
    return inversion


def card_metrics(card: Mapping[str, Any], base: dict[str, Any]) -> dict[str, float] | None:
    """The card's top-1 and ASR when `card_measures_sweep` (and no proxy ASR is needed), else None."""
    if base.get("proxy") is not None:
        return None  # no card measured the proxy ASR
    values = {k: card.get(k) for k in (TOP1, ASR)}
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values.values()):
        return None
    return {k: float(v) for k, v in values.items()} if card_measures_sweep(card, base) else None


def card_measures_sweep(card: Mapping[str, Any], base: dict[str, Any]) -> bool:
    """Whether a pre-training card's numbers are this sweep's start: same evaluation folder, subset and trigger.

    Trials do not re-evaluate the starting model, so the sweep's start must be measured the way its trials are; a
    card from other data (or without its config) is not trusted.
    """
    train = (card.get("config") or {}).get("train") or {}
    if not train:
        return False
    spec = space.trial_spec(base, {}, "sweep base")
    data = train.get("data") or {}
    same_folder = data.get("eval_dir") is not None and Path(data["eval_dir"]).resolve() == Path(
        spec.data.eval_dir).resolve()
    return (same_folder and data.get("eval_subset") == spec.data.eval_subset
            and _same_attack(train.get("attack") or {}, spec.attack))


def _same_attack(recorded: Mapping[str, Any], attack: AttackSpec) -> bool:
    # Cards written before trigger_seed/params existed measured with their defaults: compare validated specs.
    try:
        return AttackSpec.model_validate(recorded) == attack
    except ValueError:
        return False


def build_preset_model(preset: str, objective: str, workdir: Path,
                       echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The preset's pre-trained poisoned model, built in-process by the pre-training driver if not cached.

    Returns:
        The selected checkpoint and the preset's data paths.
    """
    from cleansweep.experiments import presets
    from cleansweep.pretrain import driver as pretrain

    paths = presets.prepare_demo_data(workdir)
    # The same run name (and cache) as `cleansweep pretrain --preset demo --objective ...`.
    raw = {"name": layout.preset_run_name(preset, objective),
           "train": presets.pretrain_spec(preset, objective, paths), "ray": {"num_workers": 0}}
    cfg = validate(PretrainConfig, raw, f"preset {preset}")
    selected = layout.selected_checkpoint(workdir, cfg.name)
    if selected.is_file():
        _check_cached_preset_model(selected, cfg, preset, layout.pretrain_dir(workdir, cfg.name))
    else:
        run_dir = layout.pretrain_dir(workdir, cfg.name)
        echo(f"preset {preset}: pre-training the poisoned {objective} model once (cached in {run_dir})")
        summary = pretrain.pretrain(cfg, workdir=workdir, resume=run_dir.exists())
        selected = Path(summary["selected"])
    return selected, paths


def _check_cached_preset_model(selected: Path, cfg: PretrainConfig, preset: str, run_dir: Path) -> None:
    """Refuse a cached preset model pre-trained with other settings (an older release's preset, another poison):
    cleaning it would answer for a model the preset no longer describes."""
    from cleansweep.models import read_card
    from cleansweep.pretrain.driver import absolute_paths

    recorded = (read_card(selected).get("config") or {}).get("train") or {}
    wanted = absolute_paths(cfg).train.model_dump(mode="json")  # as the driver records it
    differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    if differ:
        raise UserError(f"preset {preset}: the cached model {selected} was pre-trained with other settings "
                        f"({', '.join(differ)} differ from the preset's); use a new --workdir, or delete {run_dir} "
                        "to pre-train it again")


def start_eval_spec(base: dict[str, Any]) -> TrainSpec:
    """The run that evaluates the starting model as the trials see it: epochs=0, unperturbed, evaluate only."""
    # The default method (`method: {}`), whose `prepare` leaves the starting weights as they are.
    return space.trial_spec({**base, "method": {}}, {"epochs": 0, "eval_at_start": True})


def evaluate_start(spec: TrainSpec) -> dict[str, float]:
    """Evaluate the starting model once (`start_eval_spec`), in this process."""
    from cleansweep import fit

    seen: list[dict[str, Any]] = []
    fit.fit(spec, lambda metrics, checkpoint_dir: seen.append(metrics), checkpoints="none")
    return {k: float(seen[0][k]) for k in (TOP1, ASR, PROXY_ASR) if k in seen[0]}


def _absolute(data: DataSpec | None) -> DataSpec | None:
    # Tune moves each trial into its trial folder (`ray.tune.Trainable`, `RAY_CHDIR_TO_TRIAL_DIR`): hand them
    # absolute paths. A shard pattern is made absolute lexically (os.path.abspath): its braces name no file.
    if data is None:
        return None
    train = ({"train_csv": Path(data.train_csv).resolve()} if data.train_csv is not None
             else {"train_shards": os.path.abspath(data.train_shards)})
    return data.model_copy(update={**train, "eval_dir": Path(data.eval_dir).resolve()})


def _check_paths(base: dict[str, Any]) -> None:
    data = base["data"]
    if data.get("train_csv") is not None and not Path(data["train_csv"]).is_file():
        raise UserError(f"data.train_csv {data['train_csv']} not found; point it at the cleaning image-caption CSV")
    if data.get("train_shards") is not None:
        from cleansweep.data.shards import expand_shards

        expand_shards(data["train_shards"])  # a bad pattern or a missing shard -> one line naming it
    if not Path(data["eval_dir"]).is_dir():
        raise UserError(f"data.eval_dir {data['eval_dir']} not found; point it at an ImageNet-style folder")
