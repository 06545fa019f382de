"""Shared fixtures: a tiny synthetic world on disk and a one-epoch training spec on it.

Generic on purpose so every module's tests can reuse them:
- `tiny_world`: the paths dict of `make_demo_world` (train_csv, clean_csv, eval_dir, out_dir, ...), 64 training
  pairs, 32 clean pairs, 6 classes (banana is class 0), 36 evaluation images at 32 px. Built once per session.
- `tiny_spec`: a `TrainSpec` dict (plain dict: tests `deep_update` it) for one CPU epoch of tiny-rn on it.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cleansweep.data import make_demo_world

    out = tmp_path_factory.mktemp("tiny-world") / "world"
    return make_demo_world(out, seed=0, n_train=64, n_clean=32, n_eval=36, image_size=32, num_classes=6)


@pytest.fixture()
def tiny_spec(tiny_world: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"name": "tiny-rn"},
        "data": {"train_csv": tiny_world["train_csv"], "eval_dir": tiny_world["eval_dir"], "batch_size": 16,
                 "eval_batch_size": 64},
        "attack": {"patch_size": 4},
        "method": {"name": "contrastive"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "epochs": 1,
        "eval_every": 1.0,
        "device": "cpu",
        "seed": 0,
    }
