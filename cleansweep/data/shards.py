"""Image-caption pairs from WebDataset tar shards: the img2dataset / open_clip layout, `KEY.jpg|png|webp` + `KEY.txt`
(+ an optional `KEY.json`, ignored), selected with a brace pattern such as `DIR/{00000..00099}.tar`.

An epoch is `num_samples` pairs (open_clip's `--train-num-samples`; default: every pair of the shards, counted from a
`sizes.json` beside them when there is one, else from the tar headers). Shards are shuffled per epoch with a seed of
(seed, epoch), then dealt round-robin to the `world x loader_workers` readers (Ray Train ranks x DataLoader workers);
each reader cycles through its own shards until it has produced its share (a seeded shuffle buffer mixes pairs
across its shards), so every rank sees the same number of batches and two readers never share a shard in an epoch.
Items are the training dicts of `pairs.ImageCaptionDataset`
(`image`, `text`, `index`, SSL views), `index` being the pair's position in the shard list (stable across epochs),
so deep clustering and the SSL views' seeds work as they do on a CSV.

Resume mid-epoch: the order is a function of (seed, epoch, world, loader workers) alone, so a resumed run that skips
the batches already done (the training loop reads and drops them) sees exactly the pairs an uninterrupted run would.
It re-reads the skipped part of the epoch (at most one epoch of I/O); with a different number of workers the order,
not the set of pairs of the epoch, changes. Bad data follows `on_bad_image`: a corrupt tar, a sample without caption
or image, an undecodable image, or a member above `MAX_MEMBER_BYTES` is skipped and counted (`skip`) or refused with
one line naming the shard and key (`fail`); a corrupt tar under `skip` ends that shard's pass.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from cleansweep.data.images import BadImage, open_rgb
from cleansweep.data.pairs import BAD_IMAGE_POLICIES, item_seed, read_pairs, resolve_image_paths, training_item
from cleansweep.errors import UserError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# One member of a shard (an image or a caption): a 224 px JPEG is ~20-60 KB and img2dataset keeps originals of a few
# MB, so a member past 64 MiB is not a pair. Checked on the tar header, before its bytes are read.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_SHARDS = 10**6
# Samples shuffled within a reader's stream, held undecoded (~50 KB each at 224 px): open_clip's buffer is 5,000.
SHUFFLE_BUFFER = 1000


def expand_shards(pattern: str) -> list[Path]:
    """The shard files a brace pattern names (webdataset's expansion: `{000..099}`, lists `{a,b}`, `::` joins).

    Raises:
        UserError: the pattern names more than `MAX_SHARDS` files, or one of them does not exist.
    """
    try:
        urls = wds.shardlists.expand_urls(str(pattern))
    except (ValueError, TypeError) as e:
        raise UserError(f"data.train_shards {pattern!r} is not a brace pattern ({e}); write e.g. "
                        "DIR/{00000..00099}.tar") from None
    if len(urls) > MAX_SHARDS:
        raise UserError(f"data.train_shards names {len(urls):,} shards, more than {MAX_SHARDS:,}; check the pattern")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise UserError(f"data.train_shards: shard {missing[0]} not found{more}; point the pattern at existing "
                        ".tar files, e.g. DIR/{00000..00099}.tar")
    return [Path(u) for u in urls]


def shard_sizes(shards: list[Path]) -> list[int]:
    """Pairs per shard: from `sizes.json` ({shard file name: count}, as img2dataset/open_clip write) beside the
    shards when it lists every shard, else counted from the tar headers (no image is decoded)."""
    sizes_file = shards[0].parent / "sizes.json"
    if sizes_file.is_file():
        try:
            sizes = json.loads(sizes_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            raise UserError(f"{sizes_file} is not a JSON object of shard sizes; fix or delete it") from None
        if isinstance(sizes, dict) and all(isinstance(sizes.get(s.name), int) and sizes[s.name] >= 0 for s in shards):
            return [sizes[s.name] for s in shards]
    return [_count_pairs(s) for s in shards]


def _count_pairs(shard: Path) -> int:
    """Keys of a shard, from its tar headers; a corrupt tar counts the keys before the damage (reading it during
    training applies on_bad_image to the rest)."""
    keys: set[str] = set()
    try:
        with tarfile.open(shard, "r|*") as tar:
            keys.update(_key_and_suffix(m.name)[0] for m in tar if m.isfile())
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass
    return len(keys)


def _key_and_suffix(name: str) -> tuple[str, str]:
    key, suffix = wds.tariterators.base_plus_ext(name)
    return (key or "", (suffix or "").lower())


class ShardDataset(IterableDataset):
    """Training dicts from WebDataset shards (see the module docstring for the epoch and the split).

    Args:
        pattern: Brace pattern of the shards.
        transform, tokenize, ssl_image_transform, ssl_text_fn, seed, on_bad_image: as `ImageCaptionDataset`.
        num_samples: Pairs per epoch over all ranks (None = every pair of the shards once).
        batch_size: Per-rank batch size: each rank's share is whole batches, split across its loader workers.
        rank, world: This Ray Train rank and the number of ranks.
        loader_workers: DataLoader workers of this rank (0 = the main process reads).
        ordered: Read every pair once in shard order, without shuffling or quota (for embedding the whole set).
    """

    def __init__(self, pattern: str, transform: Callable[[Any], torch.Tensor],
                 tokenize: Callable[[list[str]], torch.Tensor], *, num_samples: int | None = None,
                 batch_size: int = 1, rank: int = 0, world: int = 1, loader_workers: int = 0,
                 on_bad_image: str = "skip", ssl_image_transform: Callable[[Any], torch.Tensor] | None = None,
                 ssl_text_fn: Callable[[str, random.Random], str] | None = None, seed: int = 0,
                 ordered: bool = False) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image {on_bad_image!r} is not a policy; choose from: "
                            f"{', '.join(BAD_IMAGE_POLICIES)}")
        self.pattern, self.shards = pattern, expand_shards(pattern)
        sizes = shard_sizes(self.shards)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.total = sum(sizes)
        self.transform, self.tokenize, self.on_bad_image = transform, tokenize, on_bad_image
        self.ssl_image_transform, self.ssl_text_fn, self.seed = ssl_image_transform, ssl_text_fn, seed
        self.rank, self.world, self.loader_workers, self.ordered = rank, world, max(loader_workers, 1), ordered
        self.batch_size, self.epoch = batch_size, 0
        readers = world * self.loader_workers
        if not ordered and len(self.shards) < readers:
            raise UserError(f"data.train_shards has {len(self.shards)} shard(s) for {world} worker(s) x "
                            f"{self.loader_workers} loader worker(s); give at least one shard per reader")
        self.num_samples = self.total if num_samples is None else num_samples
        self.steps = self.num_samples // world // batch_size  # batches per rank and epoch

    @property
    def has_ssl_views(self) -> bool:
        return self.ssl_image_transform is not None

    def set_epoch(self, epoch: int) -> None:
        """Change the shard order and the augmentation draw (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.total if self.ordered else self.steps * self.batch_size

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * self.loader_workers + worker, worker

    def _quota(self, worker: int) -> int:
        """Pairs this loader worker yields per epoch: whole batches, the rank's batches dealt round-robin."""
        batches = self.steps // self.loader_workers + (worker < self.steps % self.loader_workers)
        return batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        reader, worker = self._reader()
        order = list(range(len(self.shards)))
        if self.ordered:
            for i in order[worker::self.loader_workers]:
                yield from (self._decode(shard, raw, index) for shard, raw, index in self._raw(i))
            return
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        mine = order[reader::self.world * self.loader_workers]
        rng = random.Random(f"{self.seed}-{self.epoch}-{reader}")
        quota, produced = self._quota(worker), 0
        while produced < quota:  # pass after pass over this reader's shards; the buffer is flushed at each pass's end
            passed = produced
            for shard, raw, index in _shuffled((x for i in mine for x in self._raw(i)), rng, SHUFFLE_BUFFER):
                yield self._decode(shard, raw, index)
                produced += 1
                if produced == quota:
                    return
            if produced == passed:
                raise UserError(f"data.train_shards: the shards of reader {reader} hold no sample; check "
                                f"{self.shards[mine[0]]} and its neighbours")

    def _raw(self, i: int) -> Iterator[tuple[Path, dict[str, Any], int]]:
        """(shard, undecoded sample, index) of shard i in file order; index = the pair's place in the shard list."""
        shard, offset = self.shards[i], self.offsets[i]
        end = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.total
        for position, sample in enumerate(self._samples(shard)):
            if sample["__key__"] is not None and offset + position >= end:
                raise UserError(f"{shard} holds more samples than counted ({end - offset}): a key's files are not "
                                f"adjacent in the tar, or {shard.parent / 'sizes.json'} is wrong; rewrite the shard "
                                "(img2dataset's layout) or fix sizes.json")
            yield shard, sample, offset + position

    def _decode(self, shard: Path, sample: dict[str, Any], index: int) -> dict[str, torch.Tensor] | None:
        if "__error__" in sample:
            return next(self._bad(shard, sample["__key__"], sample["__error__"]))
        return self._item(shard, sample, index)

    def _samples(self, shard: Path) -> Iterator[dict[str, Any]]:
        """Samples grouped by key (webdataset's grouping), streamed: one member in memory at a time. A member over
        the size bound is kept as its size only; a corrupt tar ends the shard with an error sample."""
        failure: list[str] = []
        yield from wds.tariterators.group_by_keys(_members(shard, failure))
        if failure:
            yield {"__key__": None, "__error__": failure[0]}

    def _bad(self, shard: Path, key: str | None, problem: str) -> Iterator[None]:
        if self.on_bad_image == "fail":
            where = f"sample {key!r}" if key else "the file"
            raise UserError(f"{shard}: {where}: {problem}; fix or remove it, or use on_bad_image 'skip'")
        yield None

    def _item(self, shard: Path, sample: dict[str, Any], index: int) -> dict[str, torch.Tensor] | None:
        suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
        big = next((f"member .{k} has {v.size:,} bytes, more than {MAX_MEMBER_BYTES:,}" for k, v in sample.items()
                    if isinstance(v, _TooBig)), None)
        problem = big or ("no caption (.txt)" if "txt" not in sample else "no image (.jpg/.png/.webp)" if suffix is None
                          else None)
        caption = ""
        if problem is None:
            try:
                caption = sample["txt"].decode("utf-8").strip()
                image = open_rgb(io.BytesIO(sample[suffix]))
            except UnicodeDecodeError:
                problem = "caption is not UTF-8"
            except BadImage as e:
                problem = f"cannot read image ({e})"
        if problem is None and not caption:
            problem = "empty caption"
        if problem is not None:
            return next(self._bad(shard, sample["__key__"], problem))
        return self._views(image, caption, index)

    def _views(self, image: Any, caption: str, index: int) -> dict[str, torch.Tensor]:
        return training_item(image, caption, index, seed=item_seed(self.seed, self.epoch, index),
                             transform=self.transform, tokenize=self.tokenize,
                             ssl_image_transform=self.ssl_image_transform, ssl_text_fn=self.ssl_text_fn)


class _TooBig:
    """Stands for a member past `MAX_MEMBER_BYTES`, whose bytes are never read."""

    def __init__(self, size: int) -> None:
        self.size = size


def _members(shard: Path, failure: list[str]) -> Iterator[dict[str, Any]]:
    """The files of a tar as webdataset's {fname, data, __url__} records; a read error is appended to `failure`."""
    try:
        with tarfile.open(shard, "r|*") as tar:
            for m in tar:
                if m.isfile():
                    data = _TooBig(m.size) if m.size > MAX_MEMBER_BYTES else tar.extractfile(m).read()
                    yield {"fname": m.name, "data": data, "__url__": str(shard)}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        failure.append(f"corrupt tar ({type(e).__name__})")


def _shuffled(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """A seeded shuffle buffer (webdataset's `shuffle` draws from an unseeded RNG per worker)."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def write_shards(pairs: list[tuple[Path, str]], out_dir: Path, *, per_shard: int = 1000) -> str:
    """Write (image file, caption) pairs as shards `out_dir/NNNNN.tar` + `sizes.json`; returns the brace pattern.

    Keys are the 9-digit pair number (img2dataset's); the image keeps its file's suffix.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-len(pairs) // per_shard))
    sizes = {}
    for s in range(count):
        name = f"{s:05d}.tar"
        chunk = pairs[s * per_shard:(s + 1) * per_shard]
        with wds.TarWriter(str(out_dir / name)) as sink:
            for j, (image, caption) in enumerate(chunk):
                suffix = Path(image).suffix.lstrip(".").lower()
                sink.write({"__key__": f"{s * per_shard + j:09d}", suffix: Path(image).read_bytes(), "txt": caption})
        sizes[name] = len(chunk)
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return str(out_dir / f"{{00000..{count - 1:05d}}}.tar")


def csv_to_shards(csv_path: str | Path, out_dir: Path, *, per_shard: int = 1000, image_key: str = "image",
                  caption_key: str = "caption") -> str:
    """An image-caption CSV written as shards (rows in order); returns the brace pattern."""
    df = read_pairs(csv_path, image_key, caption_key)
    images = resolve_image_paths(csv_path, df[image_key])
    return write_shards(list(zip(images, df[caption_key].tolist(), strict=True)), out_dir, per_shard=per_shard)
