"""Named presets: the calibrated demo world and the paper's settings (CC3M / CC6M) that point at user data.

A preset is a plain dict with a `description`; the functions here turn one into `TrainSpec` dicts (validated by
the caller, e.g. `config.validate(TrainSpec, spec, ...)`):

- `demo`: builds the synthetic world (`<workdir>/data/demo`), poisons its train.csv (`<workdir>/data/demo-sig`)
  and trains tiny-rn at 32 px on CPU in minutes. Pre-training objectives: `mmcl` (weights 1, 0) and `mmcl+ssl`
  (1, 1); cleaning: CleanCLIP on clean.csv from the selected pre-trained checkpoint.
- `cc3m`, `cc6m`: the paper's pre-training (RN50, 64 epochs, AdamW, cosine, 10,000 warm-up steps, lr 1e-3 from
  scratch or 5e-7 when finetuning a pre-trained checkpoint, batch 256 for MMCL and 128 for MMCL+SSL; 1,500 / 3,000
  BadNet poisons) and cleaning (100K clean pairs, batch 128, 20 epochs, 50 warm-up steps). They need the user's
  data paths: `train_csv` (already poisoned, e.g. with `cleansweep poison --num-poison 1500`), `clean_csv`,
  `eval_dir` (ImageNet validation folder).

Demo calibration, the paper's regime (2026-12-05; every row, the BadNet history and why the demo uses SIG:
docs/calibration.md; `benchmarks/calibrate_demo.py` reproduces them). World: 4,000 pre-training pairs, 30 classes,
32 px; clean set 128 pairs (3.2%, the paper's 100K of 3M) from 15 of the 30 classes (`clean_classes`), evaluation
on 900 images of all 30. Poison: SIG (horizontal sinusoid, amplitude 60/255, 6 periods) -> "banana", the lowest
rate at which both objectives hold ASR >= 0.9 at every evaluation from epoch 4 on, so whichever epoch pre-training
selects (highest top-1) is backdoored (top-1 / ASR of the last evaluation):

| poisons | MMCL | MMCL+SSL |
|---|---|---|
| 2.5% (100) | 0.931 / 1.000 | 0.906 / 0.990 |
| 1% (40) | 0.927 / 0.992 | 0.908 / 0.990 |
| **0.5% (20), shipped** | 0.934 / 0.992 | 0.911 / 0.993 |
| 0.25% (10) | 0.934 / 0.970 | 0.913 / 0.954 (both dip under 0.9 mid-run: not shipped) |

CleanCLIP (10 epochs, batch 32) on the 0.5% models, final top-1 / ASR: MMCL lr 3e-4 0.783 / 0.143, 1e-3 0.577 /
0.000, 3e-3 0.404 / 0.000; MMCL+SSL 0.840 / 0.957, 0.594 / 0.000, 0.442 / 0.000. Cleaning costs accuracy, and
the MMCL+SSL model is the harder one to clean (at 3e-4 its backdoor stays), as in the paper. A BadNet patch is
learnt by MMCL but undone by MMCL+SSL's own SSL term at 32 px (ASR 0.51-0.71 at every rate from 2.5% to 15%):
docs/calibration.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cleansweep.config import AttackSpec, deep_update
from cleansweep.errors import UserError
from cleansweep.runtime import layout

_DEMO: dict[str, Any] = {
    "description": "synthetic 32 px world (30 classes incl. banana), 0.5% SIG poisons (sinusoid), tiny-rn on CPU;"
                   " cleaning on 128 pairs (3%) from 15 of the classes",
    "model": "tiny-rn",
    # The paper's regime: 128 clean pairs = 3.2% of the 4,000 pre-training pairs (CleanCLIP: 100K of 3M-6M), drawn
    # from 15 of the 30 classes (a shift from the evaluation set, which covers all 30).
    "world": {"n_train": 4000, "n_clean": 128, "n_eval": 900, "image_size": 32,
              # Pinned (not the world's defaults) so the calibration holds if the defaults change.
              "knobs": {"num_classes": 30, "shared_attributes": 2, "clutter": 2, "noise": 0.05, "caption_noise": 0.1,
                        "jitter": 0.5, "colour_jitter": 0.06, "pattern_contrast": 0.8, "clean_classes": 15}},
    # SIG, not BadNet: at 32 px the SSL term of MMCL+SSL pre-training undoes a BadNet patch (calibration above).
    # Its parameters are pinned (not the trigger's defaults) so the calibration holds if the defaults change.
    "poison": {"attack": "sig", "target": "banana", "fraction": 0.005, "params": {"delta": 60 / 255, "frequency": 6}},
    "pretrain": {
        "common": {"optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 50, "schedule": "cosine"},
                   "data": {"batch_size": 128, "eval_batch_size": 512}, "eval_every": 1.0},
        "mmcl": {"epochs": 8},
        "mmcl+ssl": {"epochs": 8},
    },
    # Batch 32 on 128 pairs: 4 steps per epoch (the loader drops the last partial batch).
    "clean": {"optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 8, "schedule": "cosine"},
              "data": {"batch_size": 32, "eval_batch_size": 512}, "method": {"mmcl_weight": 1.0, "ssl_weight": 1.0},
              "epochs": 10, "eval_every": 1.0},
}


def _paper(name: str, rows: str, poisons: int) -> dict[str, Any]:
    # 8 DataLoader workers per training process: decoding and augmenting 224 px JPEGs keeps a GPU busy only with
    # several processes (open_clip's training default is --workers 4 per GPU; the appendix spaces use 8).
    return {
        "description": f"the paper's {name.upper()} setting ({rows} pairs, {poisons:,} BadNet poisons, RN50 at 224 px);"
                       " needs your data paths: train_csv (poisoned), clean_csv (100K clean pairs), eval_dir",
        "model": "RN50",
        "poison": {"attack": "badnet", "target": "banana", "num_poison": poisons,
                   "params": {"patch_size": 16, "location": "random", "patch": "fresh"}},
        "pretrain": {
            "common": {"optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 10_000, "schedule": "cosine"},
                       "epochs": 64, "eval_every": 1.0, "data": {"eval_batch_size": 256, "workers": 8}},
            "finetune_lr": 5e-7,  # when paths carry "init" (poison induced by finetuning a pre-trained CLIP)
            "mmcl": {"data": {"batch_size": 256}},
            "mmcl+ssl": {"data": {"batch_size": 128}},
        },
        "clean": {"optim": {"lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 50, "schedule": "cosine"},
                  "data": {"batch_size": 128, "eval_batch_size": 256, "workers": 8},
                  "method": {"mmcl_weight": 1.0, "ssl_weight": 1.0}, "epochs": 20, "eval_every": 1.0},
    }


PRESETS: dict[str, dict[str, Any]] = {"demo": _DEMO, "cc3m": _paper("cc3m", "3.3M", 1500),
                                      "cc6m": _paper("cc6m", "6M", 3000)}


def list_presets() -> list[str]:
    """Names of the presets."""
    return list(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A copy of preset `name` (safe to modify).

    Raises:
        UserError: unknown preset.
    """
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def prepare_demo_data(workdir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build the demo world and its poisoned training set under `workdir/data` (idempotent; fast when cached).

    Returns:
        Paths: `world_dir`, `train_csv` (poisoned), `clean_train_csv` (the world's unpoisoned train.csv),
        `clean_csv` (cleaning pairs), `eval_dir`, `poison_dir`, `manifest`.
    """
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    preset = PRESETS["demo"]
    dirs = layout.demo_data_dirs(workdir, preset["poison"]["attack"])
    w = preset["world"]
    world = make_demo_world(dirs["world"], seed=seed, n_train=w["n_train"], n_clean=w["n_clean"],
                            n_eval=w["n_eval"], image_size=w["image_size"], **w["knobs"])
    p = preset["poison"]
    poison_dir = dirs["poisoned"]
    manifest = poison_csv(world["train_csv"], poison_dir, attack=p["attack"], target=p["target"],
                          fraction=p["fraction"], seed=seed, image_size=w["image_size"], **p["params"])
    return {"world_dir": world["out_dir"], "train_csv": str(poison_dir / manifest["output_csv"]),
            "clean_train_csv": world["train_csv"], "clean_csv": world["clean_csv"], "eval_dir": world["eval_dir"],
            "poison_dir": str(poison_dir), "manifest": str(poison_dir / "manifest.json")}


def _require(paths: dict[str, Any], keys: tuple[str, ...], preset: str) -> None:
    for key in keys:
        if not paths.get(key):
            raise UserError(f"preset {preset!r} needs the path {key!r}; pass it (e.g. --{key.replace('_', '-')} ...)")
        if not Path(paths[key]).exists():
            raise UserError(f"preset {preset!r}: {key} {paths[key]} does not exist; pass an existing path")


def _attack(preset: dict[str, Any]) -> dict[str, Any]:
    p = preset["poison"]
    return attack_spec(p["attack"], p["target"], p["params"])


def attack_spec(name: str, target: str, params: dict[str, Any]) -> dict[str, Any]:
    """An AttackSpec dict from a trigger's parameters: BadNet's patch fields are AttackSpec's own, every other
    parameter goes under `params`."""
    own = {k: v for k, v in params.items() if k in AttackSpec.model_fields}
    other = {k: v for k, v in params.items() if k not in AttackSpec.model_fields}
    return {"name": name, "target": target, **own, **({"params": other} if other else {})}


def pretrain_spec(preset: str, objective: str, paths: dict[str, Any], *, check_paths: bool = True,
                  **overrides: Any) -> dict[str, Any]:
    """The TrainSpec dict that pre-trains with `objective` ("mmcl" or "mmcl+ssl") on `paths["train_csv"]`.

    Args:
        preset: a preset name.
        objective: "mmcl" or "mmcl+ssl".
        paths: `train_csv`, `eval_dir` (from `prepare_demo_data` for the demo); optional `init` (a pre-trained
            checkpoint to finetune; the paper presets then use their finetuning lr 5e-7).
        check_paths: False to build the spec on paths that do not exist yet (checking flags before writing).
        **overrides: dotted keys (`optim.lr=...`, `epochs=...`) applied last.
    """
    p = get_preset(preset)
    if objective not in layout.OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose from: {', '.join(layout.OBJECTIVES)}")
    if check_paths:
        _require(paths, ("train_csv", "eval_dir"), preset)
    pre = p["pretrain"]
    spec = deep_update({"model": {"name": p["model"]}, "data": {"train_csv": str(paths["train_csv"]),
                                                                "eval_dir": str(paths["eval_dir"])},
                        "attack": _attack(p), "method": {"name": "contrastive", **layout.objective_weights(objective)}},
                       pre["common"])
    spec = deep_update(spec, pre[objective])
    if paths.get("init"):
        spec = deep_update(spec, {"model.init": str(paths["init"])})
        if "finetune_lr" in pre:
            spec = deep_update(spec, {"optim.lr": pre["finetune_lr"]})
    return deep_update(spec, overrides)


def clean_spec(preset: str, paths: dict[str, Any], init: str | Path, **overrides: Any) -> dict[str, Any]:
    """The TrainSpec dict of one CleanCLIP cleaning run of checkpoint `init` on `paths["clean_csv"]`.

    Search spaces override `optim.lr`, `method.*` etc. on top of it.
    """
    p = get_preset(preset)
    _require({**paths, "init": init}, ("clean_csv", "eval_dir", "init"), preset)
    spec = deep_update({"model": {"name": p["model"], "init": str(init)},
                        "data": {"train_csv": str(paths["clean_csv"]), "eval_dir": str(paths["eval_dir"])},
                        "attack": _attack(p), "method": {"name": "contrastive"}}, p["clean"])
    return deep_update(spec, overrides)
