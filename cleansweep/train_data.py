"""The training data of a run: the image-caption CSV or the WebDataset shards, as the loader of one rank.

A CSV is split across ranks by a resumable distributed sampler (`loop.ResumableSampler`); shards are split by the
dataset itself across ranks and DataLoader workers (`data.shards.ShardDataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cleansweep import loop
from cleansweep.augment import eda, ssl_image_transform
from cleansweep.config import DataSpec
from cleansweep.data import ImageCaptionDataset, collate_skip, read_pairs
from cleansweep.data.shards import ShardDataset, expand_shards, shard_sizes
from cleansweep.errors import UserError
from cleansweep.train_config import TrainSpec


def train_pairs(data: DataSpec) -> int:
    """Pairs of the training data: the CSV's rows (validated) or the shards' pairs (sizes.json or tar headers).

    Raises:
        UserError: a missing or malformed CSV, a shard pattern that names a missing file.
    """
    if data.train_shards is not None:
        return sum(shard_sizes(expand_shards(data.train_shards)))
    return len(read_pairs(data.train_csv, data.image_key, data.caption_key))



def datasets(spec: TrainSpec, preprocess: Callable[[Any], torch.Tensor], tokenize: Callable[[list[str]], torch.Tensor],
             rank: int, world: int) -> tuple[Dataset, Callable[[bool], Dataset]]:
    """The plain set (every pair once, no SSL views; deep clustering embeds it) and a factory of the training set,
    with or without SSL views, from the CSV or the shards."""
    d = spec.data
    common = {"on_bad_image": d.on_bad_image, "seed": spec.seed}
    views = {"ssl_image_transform": ssl_image_transform(preprocess), "ssl_text_fn": eda}
    # Training uses the deterministic preprocess, as the reference does (no random crops that cut the trigger out).
    if d.train_shards is not None:
        shards = {**common, "rank": rank, "world": world, "loader_workers": d.workers,
                  "batch_size": max(d.batch_size // world, 1), "num_samples": d.train_num_samples}
        plain = ShardDataset(d.train_shards, preprocess, tokenize, ordered=True, **shards)

        def train_shards(ssl: bool) -> Dataset:
            return ShardDataset(d.train_shards, preprocess, tokenize, **shards, **(views if ssl
                                                                                                      else {}))

        return plain, train_shards
    csv = {**common, "image_key": d.image_key, "caption_key": d.caption_key}
    plain = ImageCaptionDataset(d.train_csv, preprocess, tokenize, **csv)

    def train_csv(ssl: bool) -> Dataset:
        return ImageCaptionDataset(d.train_csv, preprocess, tokenize, **csv, **views) if ssl \
            else plain

    return plain, train_csv


def train_loader(spec: TrainSpec, dataset: Dataset, rank: int, world: int, cuda: bool) -> DataLoader:
    batch = spec.data.batch_size
    if batch % world:
        raise UserError(f"data.batch_size {batch} is not divisible by the {world} workers; use a multiple of {world}")
    per_rank = batch // world
    rows = dataset.total if isinstance(dataset, ShardDataset) else len(dataset)
    if rows < batch or len(dataset) == 0:
        raise UserError(f"{spec.data.train_source} has {rows} pairs, fewer than one batch of {batch}; "
                        "lower data.batch_size or add pairs")
    common = {"batch_size": per_rank, "drop_last": True, "collate_fn": collate_skip, "num_workers": spec.data.workers,
              "pin_memory": cuda}
    if isinstance(dataset, ShardDataset):  # the shards are split across ranks and loader workers by the dataset
        return DataLoader(dataset, **common)
    sampler = loop.ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=spec.seed,
                                    drop_last=True)
    # Its own generator: an iterator created mid-epoch on resume must not draw from the global RNG.
    generator = torch.Generator().manual_seed(spec.seed)
    return DataLoader(dataset, sampler=sampler, generator=generator, **common)
