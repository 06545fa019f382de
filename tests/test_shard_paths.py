"""WebDataset shards through the pre-training and sweep entry points: config assembly, absolute paths, the data
fingerprint on the card and the tags, and the one-line refusals (fast: no training, no Ray)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cleansweep.config import DataSpec
from cleansweep.data.shards import write_shards
from cleansweep.errors import UserError
from cleansweep.pretrain import driver, options, selection
from cleansweep.sweep import start
from cleansweep.train_config import PretrainConfig, TrainSpec


@pytest.fixture
def shards(tiny_world, tmp_path) -> str:
    """3 shards (4 + 4 + 2 pairs) of the tiny world's first 10 images; returns the brace pattern."""
    import pandas as pd

    rows = pd.read_csv(tiny_world["train_csv"]).head(10)
    root = Path(tiny_world["train_csv"]).parent
    pairs = [(root / image, caption) for image, caption in zip(rows["image"], rows["caption"], strict=True)]
    return write_shards(pairs, tmp_path / "shards", per_shard=4)


def _spec(data: dict, eval_dir: str) -> TrainSpec:
    return TrainSpec.model_validate({"data": {**data, "eval_dir": eval_dir}})


def test_data_hashes_fingerprint_shard_names_and_sizes(shards, tiny_world):
    folder = Path(shards).parent
    by_hand = hashlib.sha256(b"".join(f"{n}\t{(folder / n).stat().st_size}\n".encode()
                                      for n in ("00000.tar", "00001.tar", "00002.tar"))).hexdigest()
    hashes = selection.data_hashes(_spec({"train_shards": shards}, tiny_world["eval_dir"]))
    assert hashes == {"train_shards": shards, "train_shards_sha256": by_hand, "poison_manifest_sha256": None,
                      "eval_dir": tiny_world["eval_dir"]}
    with (folder / "00002.tar").open("ab") as f:  # a shard that changes size changes the fingerprint
        f.write(b"\0" * 512)
    assert selection.data_hashes(_spec({"train_shards": shards}, tiny_world["eval_dir"]))[
        "train_shards_sha256"] != by_hand


def test_data_hashes_of_a_csv_are_unchanged(tiny_world):
    hashes = selection.data_hashes(_spec({"train_csv": tiny_world["train_csv"]}, tiny_world["eval_dir"]))
    assert hashes["train_csv_sha256"] == hashlib.sha256(Path(tiny_world["train_csv"]).read_bytes()).hexdigest()
    assert "train_shards" not in hashes


def test_pretrain_tags_name_the_shard_pattern(shards, tiny_world):
    cfg = PretrainConfig.model_validate({"name": "r", "train": {"data": {"train_shards": shards,
                                                                         "eval_dir": tiny_world["eval_dir"]}}})
    tags = driver.run_tags(cfg)
    assert tags["cleansweep.dataset"] == shards and "cleansweep.train_csv_sha256" not in tags
    # the shards' fingerprint, as the card records it, so MLflow can tell two pre-trainings' data apart
    assert tags["cleansweep.train_shards_sha256"] == selection.data_hashes(cfg.train)["train_shards_sha256"]


def test_pretrain_config_takes_shards_from_the_yaml(shards, tiny_world, tmp_path):
    config = tmp_path / "pre.yaml"
    config.write_text(f'name: r\ntrain:\n  data: {{train_shards: "{shards}", eval_dir: {tiny_world["eval_dir"]}}}\n')
    cfg = options.pretrain_config(tmp_path, config_file=config)
    assert cfg.train.data.train_shards == shards and cfg.train.data.train_csv is None
    with pytest.raises(UserError, match="no train.data.train_csv given; pass --train-csv CSV"):
        options.pretrain_config(tmp_path, flags={"name": "r", "train.data.eval_dir": tiny_world["eval_dir"]})


def test_relative_shard_patterns_become_absolute(shards, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(shards).parent.parent)
    relative = "shards/{00000..00002}.tar"
    data = start._absolute(DataSpec(train_shards=relative, eval_dir=tiny_world["eval_dir"]))
    assert data.train_shards == shards and data.train_csv is None
    cfg = PretrainConfig.model_validate({"name": "r", "train": {"data": {"train_shards": relative,
                                                                         "eval_dir": tiny_world["eval_dir"]}}})
    assert driver.absolute_paths(cfg).train.data.train_shards == shards


def test_sweep_refuses_a_missing_shard_in_one_line(shards, tiny_world):
    start._check_paths({"data": {"train_shards": shards, "eval_dir": tiny_world["eval_dir"]}})  # all there: passes
    missing = shards.replace("00002}", "00003}")
    with pytest.raises(UserError, match=r"shard .*00003\.tar not found"):
        start._check_paths({"data": {"train_shards": missing, "eval_dir": tiny_world["eval_dir"]}})
