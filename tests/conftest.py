"""Shared fixtures: a tiny synthetic world on disk and a one-epoch training spec on it.

Generic on purpose so every module's tests can reuse them:
- `tiny_world`: the paths dict of `make_demo_world` (train_csv, clean_csv, eval_dir, out_dir, ...), 64 training
  pairs, 32 clean pairs, 6 classes (banana is class 0), 36 evaluation images at 32 px. Built once per session.
- `tiny_spec`: a `TrainSpec` dict (plain dict: tests `deep_update` it) for one CPU epoch of tiny-rn on it.
- `tiny_checkpoint`: a tiny backdoored pre-trained model (integration suites: sweeps, MLflow on PostgreSQL), built
  once per session.
- `s3`: a moto S3 server on loopback with one empty bucket and the AWS variables pointing at it (tests/s3_server.py).
"""

from __future__ import annotations

from typing import Any

import pytest

ASR = "asr_top1"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    from s3_server import serve

    yield from serve(monkeypatch)


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


TINY_PATCH = 8  # a fixed 8 px BadNet patch in a fixed corner: the tiny model takes it in a few epochs (4 px: not)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny poisoned pre-trained model: session.fit on 512 synthetic pairs with 20% BadNet poisons.

    Measured (2 CPU cores, 25 s on a quiet machine, minutes under load): top1 0.86-0.94, ASR 0.47-1.0 (thread
    counts change the float sums). The evaluation with the highest ASR is kept, so cleaning starts from a model the
    trigger controls and the ASR constraint has something to do.
    """
    import shutil

    from cleansweep import fit as session
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    out = tmp_path_factory.mktemp("pretrained")
    world = make_demo_world(out / "world", seed=0, n_train=512, n_clean=32, n_eval=36, image_size=32, num_classes=6)
    manifest = poison_csv(world["train_csv"], out / "poisoned", attack="badnet", target="banana", fraction=0.2,
                          seed=0, image_size=32, patch_size=TINY_PATCH, location="fixed", patch="fixed")
    spec = {"model": {"name": "tiny-rn"}, "epochs": 6, "device": "cpu", "seed": 0,
            "attack": {"patch_size": TINY_PATCH, "location": "fixed", "patch": "fixed"},
            "data": {"train_csv": str(out / "poisoned" / manifest["output_csv"]), "eval_dir": world["eval_dir"],
                     "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    kept: dict[str, Any] = {}

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None and metrics[ASR] > kept.get(ASR, -1.0):
            shutil.copytree(checkpoint_dir, out / "last", dirs_exist_ok=True)
            kept.update(metrics)

    session.fit(spec, report)
    return {"world": world, "checkpoint": out / "last" / "model.safetensors", "metrics": kept}
