"""The paper's architectures end to end at 224 px: pre-train RN50 and ViT-B-32 on WebDataset shards with
`cleansweep pretrain`, then clean each with a 2-trial `cleansweep search` on shards, all on CPU.

Counts are tiny (16 pairs, batch 8, 2 steps per epoch, 10 evaluation images of 2 classes): this checks that the
real models, 224 px images, shards and the whole CLI path work together, not what the models learn. Real Ray (token
auth, temp HOME), real Optuna and a real sqlite MLflow store; every number is read back from what was written.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cleansweep import cli, tracking
from cleansweep.data import make_demo_world
from cleansweep.data.shards import csv_to_shards, expand_shards
from cleansweep.pretrain.selection import shards_sha256

PAIRS, BATCH, EVAL_IMAGES = 16, 8, 10


@pytest.fixture(scope="module")
def world_224(tmp_path_factory) -> dict[str, Any]:
    """A 2-class demo world at 224 px, its training and cleaning CSVs written as 2 shards of 8 pairs each."""
    out = tmp_path_factory.mktemp("world224")
    world = make_demo_world(out / "world", seed=0, n_train=PAIRS, n_clean=PAIRS, n_eval=EVAL_IMAGES, image_size=224,
                            num_classes=2)
    world["train_shards"] = csv_to_shards(world["train_csv"], out / "train-shards", per_shard=BATCH)
    world["clean_shards"] = csv_to_shards(world["clean_csv"], out / "clean-shards", per_shard=BATCH)
    return world


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    """Token-auth Ray with its token in a temp HOME, sqlite MLflow in the workdir (as tests/test_search.py)."""
    from ray._raylet import AuthenticationTokenLoader

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    AuthenticationTokenLoader.instance().reset_cache()
    yield tmp_path
    AuthenticationTokenLoader.instance().reset_cache()


def pretrain_and_sweep(model: str, world: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """`cleansweep pretrain CONFIG.yaml` on the training shards, then `cleansweep search SPACE.yaml` (2 trials) on
    the cleaning shards from the selected checkpoint; returns the card, the sweep's children and its leaderboard."""
    import pandas as pd

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "pretrain.yaml"
    config.write_text(textwrap.dedent(f"""
        name: pre-{model}
        train:
          model: {{name: {model}}}
          data: {{train_shards: "{world['train_shards']}", eval_dir: {world['eval_dir']}, batch_size: {BATCH},
                  eval_batch_size: {EVAL_IMAGES}}}
          epochs: 1
          optim: {{lr: 1.0e-4, warmup_steps: 1}}
          device: cpu
        ray: {{num_workers: 0}}
        selection: last
        """))
    assert cli.main(["pretrain", str(config), "--workdir", str(workdir)]) == 0
    selected = workdir / "pretrain" / f"pre-{model}" / "selected" / "model.safetensors"
    card = json.loads(selected.with_suffix(".json").read_text())
    space = workdir / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {selected}, name: {model}}}
        data: {{train_shards: "{world['clean_shards']}", eval_dir: {world['eval_dir']}, batch_size: {BATCH},
                eval_batch_size: {EVAL_IMAGES}}}
        epochs: 1
        eval_every: 1
        objective: {{threshold: 1.0}}
        base: {{optim.warmup_steps: 1, method.ssl_weight: 0.0, device: cpu}}
        space:
          optim.lr: {{loguniform: [1.0e-5, 1.0e-4]}}
        search: {{algorithm: optuna, num_samples: 2, max_concurrent: 1}}
        resources: {{cpu: 1}}
        """))
    assert cli.main(["search", str(space), "--name", f"clean-{model}", "--workdir", str(workdir)]) == 0
    client = tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))
    exp = client.get_experiment_by_name("cleansweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.info.run_name == f"clean-{model}"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    board = pd.read_csv(workdir / "sweeps" / f"clean-{model}" / "leaderboard.csv")
    return {"card": card, "selected": selected, "children": children, "board": board}


@pytest.mark.integration
@pytest.mark.parametrize("model", ["RN50", "ViT-B-32"])
def test_pretrain_then_clean_at_224px_on_shards(model, world_224, ray_env):
    out = pretrain_and_sweep(model, world_224, ray_env / "work")
    card = out["card"]
    assert card["model"] == model and card["config"]["train"]["data"]["train_shards"].endswith(".tar")
    # The card fingerprints the shards it trained on: names and byte sizes, recomputed here by hand.
    shards = expand_shards(world_224["train_shards"])
    assert len(shards) == PAIRS // BATCH
    assert card["data"]["train_shards_sha256"] == shards_sha256(shards)
    assert card["step"] == PAIRS // BATCH  # selection last: after one epoch of 2 batches of 8
    assert 0.0 <= card["zeroshot_top1"] <= 1.0 and card["metrics"]["num_images"] == EVAL_IMAGES
    children = out["children"]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert child.data.params["model.name"] == model
        assert child.data.params["data.train_shards"].endswith(".tar")
    board = out["board"]
    assert len(board) == 2 and board["feasible"].all()  # threshold 1.0: every evaluation is feasible
    assert (board["step"] == PAIRS // BATCH).all()  # each trial: one epoch over the 16 cleaning pairs in 2 batches
    assert Path(board.iloc[0]["checkpoint"], "model.safetensors").is_file()
