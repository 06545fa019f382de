"""WebDataset shards (cleansweep.data.shards): the layout read back pair for pair, the split over ranks and loader
workers, the epoch's size, determinism and resume, and every kind of bad shard under both policies."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from cleansweep import fit
from cleansweep.config import DataSpec, deep_update
from cleansweep.data import collate_skip
from cleansweep.data.shards import ShardDataset, csv_to_shards, expand_shards, shard_sizes, write_shards
from cleansweep.errors import UserError
from cleansweep.models import load_state_dict_file

TO_TENSOR = transforms.ToTensor()


def _tokenize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer that keeps the caption's number: 'pair 17' -> [17]."""
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def _pairs(tmp_path: Path, n: int) -> list[tuple[Path, str]]:
    """n 4x4 PNGs whose red channel encodes the pair number, captioned 'pair i'."""
    out = []
    for i in range(n):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), i % 256, dtype=np.uint8)).save(path)
        out.append((path, f"pair {i}"))
    return out


def _dataset(pattern: str, **kw) -> ShardDataset:
    return ShardDataset(pattern, TO_TENSOR, _tokenize, **kw)


def _indices(ds: ShardDataset, workers: int = 0) -> list[int]:
    loader = DataLoader(ds, batch_size=None if ds.ordered else ds.batch_size, num_workers=workers,
                        collate_fn=None if ds.ordered else collate_skip)
    if ds.ordered:
        return [int(item["index"]) for item in loader]
    return [int(i) for batch in loader for i in batch["index"]]


@pytest.fixture()
def shards(tmp_path: Path) -> str:
    return write_shards(_pairs(tmp_path, 40), tmp_path / "shards", per_shard=5)


def test_written_shards_read_back_pair_for_pair(shards: str, tmp_path: Path) -> None:
    files = expand_shards(shards)
    assert [f.name for f in files] == [f"{i:05d}.tar" for i in range(8)]
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text()) == {f.name: 5 for f in files}
    items = list(_dataset(shards, ordered=True))
    assert [int(it["index"]) for it in items] == list(range(40))
    for it in items:  # caption, image and index travel together
        i = int(it["index"])
        assert int(it["text"][0]) == i and torch.allclose(it["image"][0], torch.full((4, 4), i / 255))


def test_sizes_are_counted_from_the_tars_without_sizes_json(shards: str, tmp_path: Path) -> None:
    (tmp_path / "shards" / "sizes.json").unlink()
    assert shard_sizes(expand_shards(shards)) == [5] * 8


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (4, 2)])
def test_ranks_and_loader_workers_split_an_epoch_without_overlap(shards: str, world: int, workers: int) -> None:
    # 40 pairs, batch 5 per rank: every rank gets the same number of batches, and one epoch over all ranks reads
    # every pair exactly once (each reader owns whole shards: 8 shards over world x workers readers).
    seen = []
    for rank in range(world):
        ds = _dataset(shards, batch_size=5, rank=rank, world=world, loader_workers=workers, seed=3)
        got = _indices(ds, workers)
        assert len(got) == len(ds) == 40 // world
        seen += got
    assert sorted(seen) == list(range(40))


def test_num_samples_sets_the_epoch_and_epochs_reshuffle(shards: str) -> None:
    ds = _dataset(shards, batch_size=4, num_samples=24, seed=1)
    first = _indices(ds)
    assert len(first) == len(ds) == 24 and len(set(first)) == 24
    assert _indices(ds) == first  # same (seed, epoch): same order
    ds.set_epoch(1)
    assert _indices(ds) != first
    longer = _dataset(shards, batch_size=4, num_samples=100, seed=1)
    assert len(_indices(longer)) == 100  # past one pass the reader cycles over its shards


def test_a_resumed_epoch_continues_with_the_same_pairs(shards: str) -> None:
    ds = _dataset(shards, batch_size=5, seed=7)
    ds.set_epoch(2)
    full = [b["index"].tolist() for b in DataLoader(ds, batch_size=5, collate_fn=collate_skip)]
    resumed = _dataset(shards, batch_size=5, seed=7)
    resumed.set_epoch(2)
    tail = [b["index"].tolist() for b in itertools.islice(DataLoader(resumed, batch_size=5, collate_fn=collate_skip),
                                                           3, None)]
    assert tail == full[3:]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def bad_shards(tmp_path: Path) -> str:
    d = tmp_path / "bad"
    d.mkdir()
    _tar(d / "00000.tar", {"a.png": _png(1), "a.txt": b"pair 1", "b.png": _png(2),  # b: no caption
                           "c.png": b"not a png", "c.txt": b"pair 3",  # c: undecodable image
                           "d.txt": b"pair 4",  # d: no image
                           "e.png": _png(5), "e.txt": b"pair 5"})
    _tar(d / "tmp.tar", {name: data for i in range(6) for name, data in ((f"k{i}.png", _png(i)),
                                                                          (f"k{i}.txt", f"pair {i}".encode()))})
    raw = (d / "tmp.tar").read_bytes()
    (d / "tmp.tar").unlink()
    (d / "00001.tar").write_bytes(raw[: len(raw) // 3 + 100])  # cut mid-block: a truncated download
    return str(d / "{00000..00001}.tar")


def test_bad_samples_are_skipped_and_counted(bad_shards: str) -> None:
    items = list(_dataset(bad_shards, ordered=True, on_bad_image="skip"))
    good = [int(it["text"][0]) for it in items if it is not None]
    assert good[:2] == [1, 5]  # a and e of the first shard; b, c, d skipped
    assert sum(it is None for it in items[:5]) == 3
    assert items[-1] is None  # the truncated tar ends its shard with one skipped item
    assert all(int(x) < 6 for x in good[2:]) and len(good) >= 2


@pytest.mark.parametrize("problem", ["no caption", "cannot read image", "no image", "corrupt tar"])
def test_fail_policy_names_the_shard_and_the_sample(bad_shards: str, tmp_path: Path, problem: str) -> None:
    d = Path(bad_shards).parent
    keep = {"no caption": ("b.png",), "cannot read image": ("c.png", "c.txt"), "no image": ("d.txt",)}
    if problem == "corrupt tar":
        (d / "junk.tar").write_bytes(bytes(range(256)) * 8)
        pattern = str(d / "junk.tar")
    else:
        with tarfile.open(d / "00000.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.name in keep[problem]}
        _tar(d / "one.tar", members)
        pattern = str(d / "one.tar")
    with pytest.raises(UserError) as err:
        list(_dataset(pattern, ordered=True, on_bad_image="fail"))
    msg = str(err.value)
    assert problem in msg and Path(pattern).name in msg and "\n" not in msg and "on_bad_image" in msg


def test_a_member_over_the_size_bound_is_never_read(shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cleansweep.data import shards as module

    monkeypatch.setattr(module, "MAX_MEMBER_BYTES", 10)  # every PNG is larger: all are refused by their header
    items = list(_dataset(shards, ordered=True))
    assert len(items) == 40 and all(it is None for it in items)
    with pytest.raises(UserError, match="more than 10"):
        list(_dataset(shards, ordered=True, on_bad_image="fail"))


@pytest.mark.parametrize("pattern,expected", [
    ("{dir}/{{00000..00003}}.tar", "not found"),
    ("{dir}/nothing-{{0..2}}.tar", "not found"),
])
def test_a_pattern_that_matches_nothing_is_one_line(tmp_path: Path, pattern: str, expected: str) -> None:
    with pytest.raises(UserError) as err:
        expand_shards(pattern.format(dir=tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_more_readers_than_shards_is_refused(shards: str) -> None:
    with pytest.raises(UserError, match="at least one shard per reader"):
        _dataset(shards, world=4, loader_workers=3)


def test_csv_and_shards_together_or_neither_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of train_csv"):
        DataSpec(train_csv=tmp_path / "a.csv", train_shards="x/{0..1}.tar", eval_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one of train_csv"):
        DataSpec(eval_dir=tmp_path)
    with pytest.raises(ValueError, match="train_num_samples"):
        DataSpec(train_csv=tmp_path / "a.csv", train_num_samples=10, eval_dir=tmp_path)


class _Recorder:
    def __init__(self, keep: Path, steps: tuple[int, ...]) -> None:
        self.metrics, self.keep, self.steps = [], keep, steps

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir is not None and metrics["step"] in self.steps:
            import shutil

            shutil.copytree(checkpoint_dir, self.keep / f"step{metrics['step']}")


@pytest.fixture()
def shard_spec(tiny_spec: dict, tiny_world: dict, tmp_path: Path) -> dict:
    pattern = csv_to_shards(tiny_world["train_csv"], tmp_path / "train-shards", per_shard=16)  # 64 pairs, 4 shards
    data = {k: v for k, v in tiny_spec["data"].items() if k != "train_csv"}
    return {**tiny_spec, "data": {**data, "train_shards": pattern, "workers": 2}}


def test_a_run_on_shards_resumes_bit_exact_mid_epoch(shard_spec: dict, tmp_path: Path) -> None:
    # MMCL+SSL on 4 shards read by 2 loader workers: the resumed run repeats the uninterrupted one exactly.
    spec = deep_update(shard_spec, {"epochs": 2, "eval_every": 0.5, "method.ssl_weight": 1.0})
    full = _Recorder(tmp_path, (2, 8))
    fit.fit(spec, full)
    assert [m["step"] for m in full.metrics] == [0, 2, 4, 6, 8]
    assert full.metrics[0]["params"]["train_rows"] == 64
    resumed = _Recorder(tmp_path / "resumed", (8,))
    (tmp_path / "resumed").mkdir()
    fit.fit(spec, resumed, resume_from=str(tmp_path / "step2"))
    a = load_state_dict_file(tmp_path / "step8" / fit.MODEL_FILE)
    b = load_state_dict_file(tmp_path / "resumed" / "step8" / fit.MODEL_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_deep_clustering_embeds_every_pair_of_the_shards(shard_spec: dict) -> None:
    spec = deep_update(shard_spec, {"method.name": "deep_cluster", "method.cluster_weight": 1.0,
                                    "method.num_clusters": 4, "data.train_num_samples": 32})
    rec = _Recorder(Path("."), ())
    fit.fit(spec, rec)
    assert rec.metrics[0]["params"]["steps_per_epoch"] == 2  # 32 pairs per epoch, batch 16
    assert np.isfinite(rec.metrics[-1]["loss"])
