"""How big a study runs: Ray Train workers, GPUs and CPUs per worker, DataLoader workers, CPUs and GPUs per trial.

`plan` resolves the user's `scale` (the `cleansweep study` flags `--workers`, `--gpus-per-worker`,
`--cpus-per-worker`, `--loader-workers`, `--trial-cpus`, `--trial-gpus`) against a study's defaults: the Ray
settings of its pre-training, the preset's `data.workers`, and each cleaning space's `resources` and `data.workers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cleansweep.config import DataSpec, RaySpec, deep_update, validate
from cleansweep.errors import UserError
from cleansweep.limits import MAX_WORKERS
from cleansweep.runtime import layout
from cleansweep.sweep.config import ResourcesSpec

# The keys of `scale`, named as the CLI flags (`loader_workers` -> `--loader-workers`).
SCALE_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker", "loader_workers", "trial_cpus", "trial_gpus")


def _loader_workers(spec: Mapping[str, Any]) -> int:
    return (spec.get("data") or {}).get("workers", DataSpec.model_fields["workers"].default)


def _check(study: str, given: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - set(SCALE_KEYS))
    if unknown:
        raise UserError(f"study {study!r}: unknown scale key {unknown[0]!r}; choose from: {', '.join(SCALE_KEYS)}")
    # RaySpec.use_gpu asks Ray Train for one whole GPU per worker (ScalingConfig(use_gpu=True) reserves GPU: 1).
    if given.get("gpus_per_worker") not in (None, 0, 1):
        raise UserError(f"study {study!r}: gpus_per_worker {given['gpus_per_worker']!r} must be 0 or 1 (one whole "
                        "GPU per Ray Train worker); for more GPUs raise --workers")
    loader = given.get("loader_workers")
    if loader is not None and (isinstance(loader, bool) or not isinstance(loader, int)
                               or not 0 <= loader <= MAX_WORKERS):
        raise UserError(f"study {study!r}: loader_workers {loader!r} must be an integer in 0..{MAX_WORKERS}")


def _pretrain(study: str, preset: str, ray_defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    from cleansweep.experiments import presets

    ray = dict(ray_defaults)
    ray.update({key: given[flag] for key, flag in (("num_workers", "workers"), ("cpus_per_worker", "cpus_per_worker"))
                if flag in given})
    if "gpus_per_worker" in given:
        ray["use_gpu"] = given["gpus_per_worker"] == 1
    ray = validate(RaySpec, ray, f"study {study} scale").model_dump(exclude={"address"})
    if ray["num_workers"] == 0 and ray["use_gpu"]:
        raise UserError(f"study {study!r}: 0 Ray Train workers run pre-training in the driver process, where no GPU "
                        "is reserved; pass --workers 1 or more, or --gpus-per-worker 0")
    spec = presets.pretrain_spec(preset, "mmcl", {"train_csv": "", "eval_dir": ""}, check_paths=False)
    return {**ray, "loader_workers": given.get("loader_workers", _loader_workers(spec))}


def plan(study: str, preset: str, ray_defaults: Mapping[str, Any],
         spaces: Mapping[str, tuple[str, Mapping[str, Any]]], scale: Mapping[str, Any] | None) -> dict[str, Any]:
    """The resources of every stage of a study: its defaults with `scale` on top.

    Args:
        study: The study's name (for messages).
        preset: Its preset (`experiments.presets`): the pre-training and cleaning `data.workers` defaults.
        ray_defaults: RaySpec values of its pre-training.
        spaces: objective -> (source, values) of its cleaning space (`resources`, `data.workers`).
        scale: `SCALE_KEYS` -> value; None values (and absent keys) keep the defaults.

    Returns:
        `{"pretrain": {"num_workers", "use_gpu", "cpus_per_worker", "loader_workers"},
        "clean": {objective: {"cpu", "gpu", "loader_workers"}}}`.

    Raises:
        UserError: an unknown key, gpus_per_worker other than 0/1, a GPU with 0 workers (pre-training then runs in
            the driver process, outside Ray Train), or a number outside its bounds (one line each).
    """
    from cleansweep.experiments import presets

    given = {k: v for k, v in (scale or {}).items() if v is not None}
    _check(study, given)
    clean_default = _loader_workers(presets.get_preset(preset)["clean"])
    out: dict[str, Any] = {"pretrain": _pretrain(study, preset, ray_defaults, given), "clean": {}}
    for objective in layout.OBJECTIVES:
        source, space = spaces[objective]
        resources = deep_update(dict(space.get("resources") or {}),
                                {k: given[f] for k, f in (("cpu", "trial_cpus"), ("gpu", "trial_gpus")) if f in given})
        resources = validate(ResourcesSpec, resources, f"{source} resources").model_dump()
        loader = _loader_workers(space) if "workers" in (space.get("data") or {}) else clean_default
        out["clean"][objective] = {**resources, "loader_workers": given.get("loader_workers", loader)}
    return out
