"""Backdoor triggers as seeded, batched pure functions, and poisoning of image-caption CSVs with a manifest.

Triggers act on raw images (float (B, 3, H, W) in [0, 1] at the model resolution), before normalisation. Per-image
randomness (BadNet patch position and values) comes from the `torch.Generator` passed in; parts that are fixed per
run (Blended noise, WaNet warp field, a fixed BadNet patch) come from `trigger_seed`, which must be the same when
poisoning and when measuring the attack success rate (both default to 0 and the manifest records it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from cleansweep import __version__
from cleansweep.data.eval_folder import openai_templates
from cleansweep.data.images import BadImage, open_rgb, raw_transform, to_uint8_image
from cleansweep.data.pairs import read_pairs, resolve_image_paths
from cleansweep.errors import UserError

TriggerFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------------------------------------ triggers
def default_patch_size(image_size: int) -> int:
    """BadNet patch side: 16 px at 224 px (the papers' setting), scaled to the model resolution, at least 1."""
    return max(1, round(16 * image_size / 224))


def badnet(raw: torch.Tensor, generator: torch.Generator, *, patch_size: int, location: str = "random",
           patch: str = "fresh", trigger_seed: int = 0) -> torch.Tensor:
    """Paste a square patch of standard-Gaussian values in the model's normalised space.

    The patch is raw = clip(mean_c + std_c * z, 0, 1), z ~ N(0, 1), with CLIP's mean/std: what the model sees after
    normalisation is (close to) a standard Gaussian, as in the papers. The peers wrapped the values in uint8 and
    clipping a raw N(0, 1) leaves half the patch black; at 1% poisons such a patch did not take in a probe.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws positions (`location="random"`) and values (`patch="fresh"`) per image.
        patch_size: side in pixels.
        location: "random" (uniform over all positions where the patch fits) or "fixed" (bottom-right corner).
        patch: "fresh" (new values per image) or "fixed" (one patch per run, from `trigger_seed`).
        trigger_seed: seed of the fixed patch.
    """
    b, c, h, w = raw.shape
    p = patch_size
    if p > min(h, w):
        raise UserError(f"BadNet patch_size {p} is larger than the {h}x{w} image; pass a smaller patch_size")
    if location == "random":
        rows = torch.randint(0, h - p + 1, (b,), generator=generator)
        cols = torch.randint(0, w - p + 1, (b,), generator=generator)
    else:
        rows, cols = torch.full((b,), h - p), torch.full((b,), w - p)
    if patch == "fresh":
        z = torch.randn((b, c, p, p), generator=generator)
    else:
        z = torch.randn((1, c, p, p), generator=torch.Generator().manual_seed(trigger_seed)).expand(b, -1, -1, -1)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    values = (mean + std * z).clamp(0, 1).to(raw.dtype)
    out = raw.clone()
    for i, (r, col) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        out[i, :, r:r + p, col:col + p] = values[i]
    return out


def blended(raw: torch.Tensor, generator: torch.Generator, *, alpha: float = 0.2,
            trigger_seed: int = 0) -> torch.Tensor:
    """(1 - alpha) * x + alpha * noise, noise ~ U[0, 1) of the image's shape, fixed per run by `trigger_seed`."""
    noise = torch.rand(raw.shape[1:], generator=torch.Generator().manual_seed(trigger_seed)).to(raw.dtype)
    return (1 - alpha) * raw + alpha * noise


def sig(raw: torch.Tensor, generator: torch.Generator, *, delta: float = 60 / 255,
        frequency: float = 6) -> torch.Tensor:
    """SIG: add delta * sin(2 pi j f / W) along the columns j, clipped to [0, 1] (Barni et al. 2019)."""
    w = raw.shape[-1]
    wave = delta * torch.sin(2 * math.pi * torch.arange(w, dtype=raw.dtype) * frequency / w)
    return (raw + wave).clamp(0, 1)


def wanet_grid(image_size: int, *, strength: float = 1.0, grid: int = 4, trigger_seed: int = 0) -> torch.Tensor:
    """WaNet's fixed sampling grid (1, S, S, 2) (Nguyen & Tran 2021): a random k x k field, normalised to mean
    |value| 1, upsampled bicubically, scaled by strength / S and added to the identity grid."""
    field = torch.rand((1, 2, grid, grid), generator=torch.Generator().manual_seed(trigger_seed)) * 2 - 1
    field = field / field.abs().mean()
    field = F.interpolate(field, size=(image_size, image_size), mode="bicubic", align_corners=True)
    axis = torch.linspace(-1, 1, image_size)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack([xs, ys], dim=-1)[None]
    return (identity + strength * field.permute(0, 2, 3, 1) / image_size).clamp(-1, 1)


def wanet(raw: torch.Tensor, generator: torch.Generator, *, strength: float = 1.0, grid: int = 4,
          trigger_seed: int = 0) -> torch.Tensor:
    """WaNet: warp every image with the same smooth field (see `wanet_grid`), bilinear sampling."""
    b, _, h, w = raw.shape
    if h != w:
        raise ValueError(f"WaNet expects square images, got {h}x{w}")
    g = wanet_grid(h, strength=strength, grid=grid, trigger_seed=trigger_seed).to(raw.dtype).expand(b, -1, -1, -1)
    return F.grid_sample(raw, g, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


@dataclass(frozen=True)
class Trigger:
    """A registry entry: the function, what it does, and its parameters' defaults (None = from the image size)."""

    apply: Callable[..., torch.Tensor]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


TRIGGERS: dict[str, Trigger] = {
    "badnet": Trigger(badnet, "square standard-Gaussian patch (16 px at 224), random or bottom-right position",
                      {"patch_size": None, "location": "random", "patch": "fresh", "trigger_seed": 0}),
    "blended": Trigger(blended, "0.8 * image + 0.2 * uniform noise fixed per run", {"alpha": 0.2, "trigger_seed": 0}),
    "sig": Trigger(sig, "horizontal sinusoid of amplitude 60/255 and 6 periods", {"delta": 60 / 255, "frequency": 6}),
    "wanet": Trigger(wanet, "smooth warping field fixed per run (strength 1, 4x4 control grid)",
                     {"strength": 1.0, "grid": 4, "trigger_seed": 0}),
}
_CHOICES = {"location": ("random", "fixed"), "patch": ("fresh", "fixed")}


def list_triggers() -> list[str]:
    return list(TRIGGERS)


def resolve_trigger_params(name: str, image_size: int, **params: Any) -> dict[str, Any]:
    """The trigger's effective parameters: defaults filled in, checked, as recorded in manifests.

    Parameters of *other* triggers are tolerated when unset (None) or at their default, so callers can pass one
    attack configuration (patch_size, location, patch) whatever the attack; a set value that does not apply is an
    error.
    """
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose from: {', '.join(TRIGGERS)}")
    entry = TRIGGERS[name]
    out = dict(entry.defaults)
    for key, value in params.items():
        if key in entry.defaults:
            if value is not None:
                out[key] = value
            continue
        owners = [n for n, t in TRIGGERS.items() if key in t.defaults]
        if not owners:
            raise UserError(f"unknown trigger parameter {key!r}; {name} takes: {', '.join(entry.defaults)}")
        if value is not None and all(value != TRIGGERS[n].defaults[key] for n in owners):
            raise UserError(f"trigger parameter {key!r} applies to {', '.join(owners)}, not {name}; drop it")
    if "patch_size" in out:
        out["patch_size"] = default_patch_size(image_size) if out["patch_size"] is None else int(out["patch_size"])
        if not 1 <= out["patch_size"] <= image_size:
            raise UserError(f"patch_size {out['patch_size']} must be in 1..{image_size} (the image size)")
    for key, choices in _CHOICES.items():
        if key in out and out[key] not in choices:
            raise UserError(f"{key} {out[key]!r} is not valid for {name}; choose from: {', '.join(choices)}")
    return out


def create_trigger(name: str, image_size: int, **params: Any) -> TriggerFn:
    """A trigger function `fn(raw (B, 3, S, S), generator) -> raw` with its parameters bound (see TRIGGERS).

    The result is a `functools.partial`; its `.keywords` are the effective parameters.

    Raises:
        UserError: unknown attack ("unknown attack 'x'; choose from: ...") or parameter, or a bad value.
    """
    resolved = resolve_trigger_params(name, image_size, **params)
    return partial(TRIGGERS[name].apply, **resolved)


# ----------------------------------------------------------------------------------------------- poisoning
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mentions(caption: str, word: str) -> bool:
    """Whether a caption names `word` as a whole word (case-insensitive): the label-consistent candidates."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", caption.lower()) is not None


def _count(n_rows: int, num_poison: int | None, fraction: float | None) -> int:
    if (num_poison is None) == (fraction is None):
        raise UserError("give exactly one of num_poison (--num-poison) and fraction (--fraction)")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"fraction {fraction} must be in (0, 1]; e.g. 0.01 for 1%")
        return max(1, round(fraction * n_rows))
    if num_poison < 1:
        raise UserError(f"num_poison {num_poison} must be >= 1")
    return int(num_poison)


def _existing_result(out_dir: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an identical earlier result in out_dir; None when out_dir is free; UserError otherwise."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if manifest and {k: manifest.get(k) for k in request} == request:
        output = out_dir / manifest["output_csv"]
        if output.is_file() and sha256_file(output) == manifest["output_csv_sha256"]:
            return manifest
    raise UserError(f"{out_dir} exists and is not empty (nor an identical earlier result); pass a new --out folder "
                    f"or delete it")


def _triggered_images(paths: list[Path], rows: list[int], csv_path: Path, image_size: int, trigger: TriggerFn,
                      generator: torch.Generator, batch_size: int = 64) -> list[torch.Tensor]:
    """Resize (shorter side + center crop; images already S x S pass through) and trigger, in batches."""
    to_raw = raw_transform(image_size)
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        batch = []
        for row in rows[start:start + batch_size]:
            try:
                batch.append(to_raw(open_rgb(paths[row])))
            except BadImage as e:
                raise UserError(f"{csv_path}: row {row} (0-based): cannot read image {paths[row]} ({e}); fix or "
                                f"remove the row") from None
        out.extend(trigger(torch.stack(batch), generator))
    return out


def _poison(csv: str | Path, out_dir: str | Path, *, kind: str, attack: str, target: str, num_poison: int | None,
            fraction: float | None, seed: int, image_size: int, label_consistent: bool, image_key: str,
            caption_key: str, trigger_params: dict[str, Any]) -> dict[str, Any]:
    csv, out_dir = Path(csv), Path(out_dir)
    if not isinstance(target, str) or not target.strip():
        raise UserError("target must be a non-empty class name, e.g. 'banana'")
    if image_size < 1:
        raise UserError(f"image_size {image_size} must be a positive number of pixels")
    trigger = create_trigger(attack, image_size, **trigger_params)
    resolved = trigger.keywords
    df = read_pairs(csv, image_key, caption_key)
    n = _count(len(df), num_poison, fraction)
    captions = df[caption_key].tolist()
    candidates = [i for i, c in enumerate(captions) if not label_consistent or mentions(c, target)]
    pool = f"rows whose caption names {target!r}" if label_consistent else "rows"
    if n > len(candidates):
        raise UserError(f"cannot poison {n} rows: {csv} has only {len(candidates)} {pool}; ask for fewer poisons")
    request = {"kind": kind, "attack": attack, "trigger_params": resolved, "target": target, "num_poison": n,
               "seed": seed, "image_size": image_size, "label_consistent": label_consistent, "image_key": image_key,
               "caption_key": caption_key, "input_csv_sha256": sha256_file(csv)}
    existing = _existing_result(out_dir, request)
    if existing is not None:
        return existing

    # One stream for the selection and captions (numpy) and one for the per-image trigger draws (torch).
    rng = np.random.default_rng([seed, 0])
    chosen = sorted(rng.choice(candidates, size=n, replace=False).tolist())
    templates = openai_templates()
    new_captions = [captions[i] if label_consistent else templates[rng.integers(len(templates))].format(target)
                    for i in chosen]
    paths = resolve_image_paths(csv, df[image_key])
    images = _triggered_images(paths, chosen, csv, image_size, trigger, torch.Generator().manual_seed(seed))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        # Rows keep pointing at their original images (relative to the new CSV); only poisons are new files.
        out = df.copy()
        out[image_key] = [os.path.relpath(p.resolve(), out_dir.resolve()) for p in paths]
        poison_rel = [f"images/{kind}_{row:08d}.png" for row in chosen]
        for rel, image in zip(poison_rel, images, strict=True):
            to_uint8_image(image).save(tmp / rel)  # PNG: lossless, JPEG would weaken the trigger
        if kind == "poison":
            out.loc[chosen, image_key] = poison_rel
            out.loc[chosen, caption_key] = new_captions
            poisoned_rows = chosen
        else:
            added = df.loc[chosen].copy()
            added[image_key] = poison_rel
            added[caption_key] = new_captions
            out = pd.concat([out, added], ignore_index=True)
            poisoned_rows = list(range(len(df), len(df) + n))
        output_csv = csv.name
        out.to_csv(tmp / output_csv, index=False)
        manifest = {**request, "cleansweep_version": __version__, "input_csv": str(csv),
                    "num_rows": len(out), "output_csv": output_csv, "output_csv_sha256": sha256_file(tmp / output_csv),
                    "poisoned_rows": poisoned_rows, "source_rows": chosen, "poisoned_captions": new_captions}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def poison_csv(csv: str | Path, out_dir: str | Path, *, attack: str, target: str, num_poison: int | None = None,
               fraction: float | None = None, seed: int = 0, image_size: int = 224, label_consistent: bool = False,
               image_key: str = "image", caption_key: str = "caption", **trigger_params: Any) -> dict[str, Any]:
    """Poison N rows of a CSV in place of their originals: same rows in the same order, N of them triggered.

    A poisoned row gets a triggered PNG copy of its image (at `image_size`) and, unless label-consistent, a caption
    from one of the 80 OpenAI ImageNet templates with the target ("a photo of a banana."). Other rows keep their
    original image files, referenced by paths relative to the new CSV (nothing is copied or resampled).
    `poisoned_rows` lists the poisoned row indices (0-based, the same in the input and the output).

    Args:
        csv: input image-caption CSV (image paths relative to it).
        out_dir: new folder for the CSV (same file name as the input), `images/` and `manifest.json`; it must not
            exist, be empty, or hold the identical earlier result (whose manifest is then returned unchanged).
        attack: a TRIGGERS name.
        target: target class written into poisoned captions ("banana").
        num_poison: how many rows to poison (or give `fraction`).
        fraction: fraction of rows to poison, in (0, 1].
        seed: selection of rows, caption templates and per-image trigger draws.
        image_size: images are resized to this (shorter side + center crop) before the trigger.
        label_consistent: poison only rows whose caption already names the target; keep their captions.
        image_key: image column.
        caption_key: caption column.
        **trigger_params: trigger parameters (patch_size, location, patch, trigger_seed, ...).

    Returns:
        The manifest, also written to out_dir/manifest.json (sorted keys; its file sha256 identifies the data).

    Raises:
        UserError: bad path, CSV, attack, count, parameters or image; out_dir holding something else.
    """
    return _poison(csv, out_dir, kind="poison", attack=attack, target=target, num_poison=num_poison,
                   fraction=fraction, seed=seed, image_size=image_size, label_consistent=label_consistent,
                   image_key=image_key, caption_key=caption_key, trigger_params=trigger_params)


def contaminate(csv: str | Path, out_dir: str | Path, *, attack: str, target: str, num_poison: int | None = None,
                fraction: float | None = None, seed: int = 0, image_size: int = 224, label_consistent: bool = False,
                image_key: str = "image", caption_key: str = "caption", **trigger_params: Any) -> dict[str, Any]:
    """Contaminate a clean cleaning set: keep all its rows and ADD N poisoned pairs made from N of them.

    The paper's non-ideal cleaning data (5 or 10 poisons among 100K clean pairs). The added rows come last;
    `poisoned_rows` are their indices in the output CSV and `source_rows` the input rows they were made from.
    Arguments, result and errors as `poison_csv`.
    """
    return _poison(csv, out_dir, kind="contaminate", attack=attack, target=target, num_poison=num_poison,
                   fraction=fraction, seed=seed, image_size=image_size, label_consistent=label_consistent,
                   image_key=image_key, caption_key=caption_key, trigger_params=trigger_params)


