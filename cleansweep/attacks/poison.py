"""Poisoning of image-caption CSVs with a manifest: N rows replaced by triggered copies (`poison_csv`), or N
poisoned pairs added to a clean cleaning set (`contaminate`). The triggers themselves live in
`cleansweep.attacks.registry` and the modules it collects (re-exported here, where the CLI and users look for them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cleansweep import __version__
from cleansweep.attacks.noise import badnet, blended, sig, wanet, wanet_grid  # noqa: F401 - re-exported
from cleansweep.attacks.params import Trigger, TriggerFn, default_patch_size  # noqa: F401 - re-exported
from cleansweep.attacks.registry import (  # noqa: F401 - re-exported
    ATTACK_FIELDS,
    TRIGGERS,
    attack_from_manifest,
    attack_trigger,
    badclip,
    cached_patch,
    create_trigger,
    list_triggers,
    parse_trigger_param,
    resolve_trigger_params,
    validate_patch,
)
from cleansweep.attacks.structured import (  # noqa: F401 - re-exported
    colour_rgb,
    default_font_size,
    default_stripe_period,
    default_triangle_size,
    patch_positions,
    seeded_colour,
    seeded_phase,
    stamp,
    stripe_mask,
    stripes,
    text_overlay,
    triangle,
    triangle_mask,
)
from cleansweep.data.eval_folder import openai_templates
from cleansweep.data.images import BadImage, open_rgb, raw_transform, to_uint8_image
from cleansweep.data.pairs import read_pairs, resolve_image_paths
from cleansweep.errors import UserError
from cleansweep.limits import MAX_IMAGE_SIDE, SEED_MAX


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


def poison_count(n_rows: int, num_poison: int | None, fraction: float | None) -> int:
    """How many of `n_rows` to poison: `num_poison`, or `fraction` of them (at least 1); exactly one is given."""
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
    if isinstance(manifest, dict) and {k: manifest.get(k) for k in request} == request:
        output = out_dir / manifest["output_csv"]
        if output.is_file() and sha256_file(output) == manifest["output_csv_sha256"]:
            return manifest
    raise UserError(f"{out_dir} exists and is not empty (nor an identical earlier result); pass a new --out folder "
                    f"or delete it")


def choose_rows(candidates: list[int], n: int, captions: list[str], *, target: str, seed: int,
                label_consistent: bool) -> tuple[list[int], list[str]]:
    """The `n` rows to poison (sorted) and their new captions (an OpenAI template with the target, or their own
    when label-consistent); the per-image trigger draws take a separate torch stream seeded with `seed`."""
    rng = np.random.default_rng([seed, 0])
    chosen = sorted(rng.choice(candidates, size=n, replace=False).tolist())
    templates = openai_templates()
    new_captions = [captions[i] if label_consistent else templates[rng.integers(len(templates))].format(target)
                    for i in chosen]
    return chosen, new_captions


def check_request(target: str, image_size: int, seed: int) -> None:
    """Refuse (one line) an empty target, an image size outside 1..MAX_IMAGE_SIDE or a seed numpy cannot take."""
    if not isinstance(target, str) or not target.strip():
        raise UserError("target must be a non-empty class name, e.g. 'banana'")
    if not 1 <= image_size <= MAX_IMAGE_SIDE:  # triggers are built at this size: 20000 px took > 5 GB
        raise UserError(f"image_size {image_size} must be 1..{MAX_IMAGE_SIDE} pixels (the model resolution, e.g. 224)")
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed {seed} must be in 0..{SEED_MAX} (numpy's seed range)")


def trigger_images(sources: list[Any], labels: list[str], image_size: int, trigger: TriggerFn,
                   generator: torch.Generator, batch_size: int = 64) -> list[torch.Tensor]:
    """Resize (shorter side + center crop; images already S x S pass through) and trigger, in batches.

    Args:
        sources: image files or binary streams, in the order their trigger draws are taken from `generator`.
        labels: where each image comes from, for the error (`CSV: row 3 (0-based): cannot read image X`).

    Raises:
        UserError: an image that cannot be read, named by its label.
    """
    to_raw = raw_transform(image_size)
    out: list[torch.Tensor] = []
    for start in range(0, len(sources), batch_size):
        batch = []
        for source, label in zip(sources[start:start + batch_size], labels[start:start + batch_size], strict=True):
            try:
                batch.append(to_raw(open_rgb(source)))
            except BadImage as e:
                raise UserError(f"{label} ({e}); fix or remove it") from None
        out.extend(trigger(torch.stack(batch), generator))
    return out


def _poison(csv: str | Path, out_dir: str | Path, *, kind: str, attack: str, target: str, num_poison: int | None,
            fraction: float | None, seed: int, image_size: int, label_consistent: bool, image_key: str,
            caption_key: str, trigger_params: dict[str, Any]) -> dict[str, Any]:
    csv, out_dir = Path(csv), Path(out_dir)
    check_request(target, image_size, seed)
    trigger = create_trigger(attack, image_size, **trigger_params)
    resolved = trigger.keywords
    df = read_pairs(csv, image_key, caption_key)
    n = poison_count(len(df), num_poison, fraction)
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

    chosen, new_captions = choose_rows(candidates, n, captions, target=target, seed=seed,
                                       label_consistent=label_consistent)
    paths = resolve_image_paths(csv, df[image_key])
    labels = [f"{csv}: row {row} (0-based): cannot read image {paths[row]}" for row in chosen]
    images = trigger_images([paths[row] for row in chosen], labels, image_size, trigger,
                            torch.Generator().manual_seed(seed))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        poison_rel = [f"images/{kind}_{row:08d}.png" for row in chosen]
        for rel, image in zip(poison_rel, images, strict=True):
            to_uint8_image(image).save(tmp / rel)  # PNG: lossless, JPEG would weaken the trigger
        out, poisoned_rows = _poisoned_table(df, chosen, poison_rel, new_captions, paths, out_dir, kind=kind,
                                             image_key=image_key, caption_key=caption_key)
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


def _poisoned_table(df: pd.DataFrame, chosen: list[int], poison_rel: list[str], captions: list[str],
                    paths: list[Path], out_dir: Path, *, kind: str, image_key: str, caption_key: str
                    ) -> tuple[pd.DataFrame, list[int]]:
    """The output CSV's rows and the indices of its poisoned rows: poisons replace rows (`poison`) or are added."""
    # Rows keep pointing at their original images (relative to the new CSV); only poisons are new files.
    out = df.copy()
    out[image_key] = [os.path.relpath(p.resolve(), out_dir.resolve()) for p in paths]
    if kind == "poison":
        out.loc[chosen, image_key] = poison_rel
        out.loc[chosen, caption_key] = captions
        return out, chosen
    added = df.loc[chosen].copy()
    added[image_key] = poison_rel
    added[caption_key] = captions
    return pd.concat([out, added], ignore_index=True), list(range(len(df), len(df) + len(chosen)))


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


