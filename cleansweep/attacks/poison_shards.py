"""Poisoning of WebDataset shards (`KEY.jpg|png|webp` + `KEY.txt`, see `cleansweep.data.shards`) with a manifest.

`poison_shards` is `poison.poison_csv` for shards: the same pairs in the same order, N of them replaced by a
triggered PNG and (unless label-consistent) a templated caption. A pair's row is its position in the shard list
(the `index` of `ShardDataset`), so the rows chosen, their captions and the trigger's draws are those `poison_csv`
picks on a CSV holding the same pairs in the same order (`data.shards.csv_to_shards`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from cleansweep import __version__
from cleansweep.attacks.poison import (
    check_request,
    choose_rows,
    mentions,
    poison_count,
    sha256_file,
    trigger_images,
)
from cleansweep.attacks.registry import create_trigger
from cleansweep.data.images import to_uint8_image
from cleansweep.data.shards import IMAGE_SUFFIXES, MAX_MEMBER_BYTES, expand_shards
from cleansweep.errors import UserError


def _samples(shard: Path) -> Iterator[dict[str, Any]]:
    """The samples of a shard in file order: `{"__key__", suffix: bytes, ...}` (members grouped by key).

    Raises:
        UserError: a corrupt tar, a member over `MAX_MEMBER_BYTES` or a key's suffix twice (named with the shard).
    """
    def members() -> Iterator[dict[str, Any]]:
        try:
            with tarfile.open(shard, "r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    if m.size > MAX_MEMBER_BYTES:
                        raise UserError(f"{shard}: member {m.name} has {m.size:,} bytes, more than "
                                        f"{MAX_MEMBER_BYTES:,}; remove it from the shard")
                    yield {"fname": m.name, "data": tar.extractfile(m).read(), "__url__": str(shard)}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserError(f"{shard} is not a readable tar ({type(e).__name__}); rewrite or remove it") from None

    try:
        for sample in wds.tariterators.group_by_keys(members()):
            yield {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}
    except ValueError as e:  # webdataset: one key with two files of the same suffix
        raise UserError(f"{shard}: {e}; give each key one file per suffix (img2dataset's layout)") from None


def _image_suffix(sample: dict[str, Any]) -> str | None:
    return next((s for s in IMAGE_SUFFIXES if s in sample), None)


def _caption(sample: dict[str, Any]) -> str | None:
    try:
        caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    except UnicodeDecodeError:
        return None
    return caption or None


def _digest(paths: list[Path]) -> str:
    """One sha256 over the shards' own sha256s, in order: identifies the data as `input_csv_sha256` does."""
    return hashlib.sha256("\n".join(sha256_file(p) for p in paths).encode()).hexdigest()


def _output_names(count: int) -> tuple[list[str], str]:
    names = [f"{i:05d}.tar" for i in range(count)]
    return names, f"{{00000..{count - 1:05d}}}.tar"


def _existing_result(out_dir: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an identical earlier result in out_dir; None when out_dir is free; UserError otherwise."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if isinstance(manifest, dict) and {k: manifest.get(k) for k in request} == request:
        outputs = [out_dir / n for n in manifest.get("output_shard_files", [])]
        if outputs and all(p.is_file() for p in outputs) and _digest(outputs) == manifest["output_shards_sha256"]:
            return manifest
    raise UserError(f"{out_dir} exists and is not empty (nor an identical earlier result); pass a new --out folder "
                    f"or delete it")


def _scan(shards: list[Path]) -> tuple[list[str], list[str | None], list[bool]]:
    """Keys, captions and whether each sample has an image, over all shards in order (images are not decoded)."""
    keys, captions, has_image = [], [], []
    for shard in shards:
        for sample in _samples(shard):
            keys.append(sample["__key__"])
            captions.append(_caption(sample))
            has_image.append(_image_suffix(sample) is not None)
    return keys, captions, has_image


def _poisoned_pngs(shards: list[Path], chosen: list[int], image_size: int, trigger: Any, seed: int) -> list[bytes]:
    """The chosen samples' images, resized and triggered (the draws in row order, as `poison_csv`), as PNG bytes."""
    wanted, sources, labels, row = set(chosen), [], [], 0
    for shard in shards:
        for sample in _samples(shard):
            if row in wanted:
                sources.append(io.BytesIO(sample[_image_suffix(sample)]))
                labels.append(f"{shard}: sample {sample['__key__']!r}: cannot read image")
            row += 1
    images = trigger_images(sources, labels, image_size, trigger, torch.Generator().manual_seed(seed))
    out = []
    for image in images:  # PNG: lossless, JPEG would weaken the trigger
        buffer = io.BytesIO()
        to_uint8_image(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _write(shards: list[Path], tmp: Path, poisoned: dict[int, tuple[bytes, str]]) -> list[int]:
    """Shard i into `tmp/NNNNN.tar` (i in 5 digits) with the poisoned samples replaced, + sizes.json; the sizes."""
    sizes, row = [], 0
    names, _ = _output_names(len(shards))
    for shard, name in zip(shards, names, strict=True):
        sizes.append(0)
        with wds.TarWriter(str(tmp / name)) as sink:
            for sample in _samples(shard):
                if row in poisoned:
                    sample = {k: v for k, v in sample.items() if k not in IMAGE_SUFFIXES}
                    sample["png"], sample["txt"] = poisoned[row]
                sink.write(sample)
                sizes[-1] += 1
                row += 1
    (tmp / "sizes.json").write_text(json.dumps(dict(zip(names, sizes, strict=True)), indent=1))
    return sizes


def poison_shards(pattern: str, out_dir: str | Path, *, attack: str, target: str, num_poison: int | None = None,
                  fraction: float | None = None, seed: int = 0, image_size: int = 224, label_consistent: bool = False,
                  **trigger_params: Any) -> dict[str, Any]:
    """Poison N pairs of WebDataset shards in place of their originals: same pairs, same order, same keys.

    A poisoned pair gets a triggered PNG of its image (at `image_size`; its original image member is dropped) and,
    unless label-consistent, a caption from the OpenAI ImageNet templates with the target. Output: input shard i as
    `out_dir/NNNNN.tar` (i in 5 digits; as many shards as before, so as many readers fit), `sizes.json` and
    `manifest.json`, in the format `poison_csv` writes, with `input_shards` / `output_shards` (brace patterns; the
    output one relative to out_dir) and `poisoned_keys` in place of the CSV fields. `poisoned_rows` are pair
    positions in shard order (`ShardDataset`'s `index`).

    Args:
        pattern: brace pattern of the input shards, e.g. `DIR/{00000..00099}.tar`.
        out_dir: new folder; it must not exist, be empty, or hold the identical earlier result (returned as is).
        attack, target, num_poison, fraction, seed, image_size, label_consistent, **trigger_params: as `poison_csv`.

    Returns:
        The manifest, also written to out_dir/manifest.json.

    Raises:
        UserError: a pattern naming a missing file, an unreadable shard, bad count, attack or parameters, an image
            that cannot be read, or out_dir holding something else (one line each).
    """
    out_dir = Path(out_dir)
    check_request(target, image_size, seed)
    trigger = create_trigger(attack, image_size, **trigger_params)
    shards = expand_shards(pattern)
    keys, captions, has_image = _scan(shards)
    n = poison_count(len(keys), num_poison, fraction)
    candidates = [i for i, (c, img) in enumerate(zip(captions, has_image, strict=True)) if c is not None and img
                  and (not label_consistent or mentions(c, target))]
    pool = f"pairs whose caption names {target!r}" if label_consistent else "pairs with an image and a caption"
    if n > len(candidates):
        raise UserError(f"cannot poison {n} pairs: {pattern} has only {len(candidates)} {pool}; ask for fewer poisons")
    request = {"kind": "poison", "format": "webdataset", "attack": attack, "trigger_params": trigger.keywords,
               "target": target, "num_poison": n, "seed": seed, "image_size": image_size,
               "label_consistent": label_consistent, "input_shards": str(pattern),
               "input_shards_sha256": _digest(shards)}
    existing = _existing_result(out_dir, request)
    if existing is not None:
        return existing

    chosen, new_captions = choose_rows(candidates, n, [c or "" for c in captions], target=target, seed=seed,
                                       label_consistent=label_consistent)
    poisoned = dict(zip(chosen, zip(_poisoned_pngs(shards, chosen, image_size, trigger, seed), new_captions,
                                    strict=True), strict=True))
    extra = {"input_shard_files": [str(s) for s in shards], "poisoned_rows": chosen,
             "poisoned_keys": [keys[i] for i in chosen], "source_rows": chosen, "poisoned_captions": new_captions}
    return _publish(out_dir, shards, poisoned, {**request, **extra})


def _publish(out_dir: Path, shards: list[Path], poisoned: dict[int, tuple[bytes, str]],
             fields: dict[str, Any]) -> dict[str, Any]:
    """Write the shards and the manifest into a temporary folder beside out_dir, then rename it to out_dir."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sizes = _write(shards, tmp, poisoned)
        names, output = _output_names(len(sizes))
        manifest = {**fields, "cleansweep_version": __version__, "num_rows": sum(sizes), "output_shards": output,
                    "output_shard_files": names, "output_shards_sha256": _digest([tmp / name for name in names])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked by _existing_result)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
