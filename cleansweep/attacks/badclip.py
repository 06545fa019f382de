"""BadCLIP's optimised trigger patch (Liang et al., CVPR 2024): a patch tuned on a CLIP model's own embeddings.

The objective is the official code's (`cleansweep.attacks.badclip_objective`: InfoNCE between patched non-target
images and natural target captions + 500 x a triplet margin term pulling the patched embedding toward real target
images and away from its clean embedding, with EDA and AutoAugment). Scaled for small models: the official run is
50 epochs of 10K pairs at batch 64 (~7,800 Adam steps at lr 1e-3, a 16 px patch at 224 px); the default here is 200
steps at lr 0.05 (about the same total step budget, steps x lr ~ 10 vs 7.8, since Adam moves a pixel by at most
~lr per step) at batch 64, and the patch side scales with the resolution (`default_patch_size`). docs/fidelity.md
lists every deviation. The patch is saved as safetensors with a JSON card (model sha256, target, objective,
settings, similarities) and pasted by the `badclip` trigger of `cleansweep.attacks.registry`. Everything is seeded
through explicit generators; the model is only read (its train/eval mode is restored, no gradient lands on its
weights).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from cleansweep import __version__
from cleansweep.attacks.badclip_objective import (
    OBJECTIVE,
    Normalize,
    Objective,
    eval_mode,
    initial_patch,
    normalizer,
    optimise_patch,
)
from cleansweep.attacks.poison import contaminate, mentions, poison_csv
from cleansweep.attacks.registry import cached_patch, default_patch_size, patch_positions, stamp, validate_patch
from cleansweep.data import EvalFolder, openai_templates, read_pairs
from cleansweep.data.images import BadImage, open_rgb, raw_transform
from cleansweep.data.pairs import resolve_image_paths
from cleansweep.errors import UserError
from cleansweep.evaluate import resolve_device, zeroshot_classifier
from cleansweep.models import (
    card_path,
    file_sha256,
    load_checkpoint_model,
    read_card,
)
from cleansweep.runtime.atomic import write_atomic, write_json, write_text

PATCH_FILE = "badclip_patch.safetensors"  # name of the patch in a poisoned folder made with --optimise-on


# ------------------------------------------------------------------------------------------------ optimisation
def target_text_features(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], target: str,
                         templates: Sequence[str], device: str | torch.device) -> Tensor:
    """(D,) unit vector: the mean of the target's normalised template embeddings, re-normalised."""
    # The zero-shot classifier is built under inference_mode; a clone is an ordinary tensor autograd may use.
    return zeroshot_classifier(model, tokenizer, [target], templates, device)[:, 0].clone()


def _patched_features(model: nn.Module, images: Tensor, patch: Tensor, location: str, generator: torch.Generator,
                      norm: Callable[[Tensor], Tensor]) -> Tensor:
    b, _, h, w = images.shape
    rows, cols = patch_positions(b, h, w, patch.shape[-2], patch.shape[-1], location, generator)
    return F.normalize(model.encode_image(norm(stamp(images.to(patch.device), patch, rows, cols))), dim=-1)


def patched_similarity(model: nn.Module, images: Tensor, patch: Tensor | None, text_features: Tensor, *,
                       location: str = "random", seed: int = 0,
                       normalize: Normalize = (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), batch_size: int = 64,
                       device: str | torch.device = "cpu") -> float:
    """Mean cosine similarity between the images' embeddings, with `patch` pasted (None: as they are), and
    `text_features`; positions drawn from a generator seeded by `seed`."""
    device = torch.device(device)
    norm, generator = normalizer(normalize, device), torch.Generator().manual_seed(seed)
    total = 0.0
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            feats = (F.normalize(model.encode_image(norm(batch)), dim=-1) if patch is None else
                     _patched_features(model, batch, patch.to(device), location, generator, norm))
            total += float((feats @ text_features.to(device)).sum())
    return total / len(images)


# ------------------------------------------------------------------------------------------------ patch files
def save_patch(path: str | Path, patch: Tensor, meta: Mapping[str, Any]) -> Path:
    """Write `patch` (3, p, p) in [0, 1] to `path` (.safetensors, tensor 'patch') and a JSON card next to it.

    Both are written under temporary names and renamed. The card (`path.with_suffix('.json')`) holds `meta` plus
    `patch_size`, `weights` (the file name) and `sha256` (of the weights file).

    Returns:
        `path`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"patch path {path} must end in .safetensors; rename it")
    patch = validate_patch(patch.detach().to("cpu", torch.float32).contiguous(), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: safetensors.torch.save_file({"patch": patch}, str(tmp), metadata={"format": "pt"}))
    write_json(card_path(path), {**dict(meta), "patch_size": patch.shape[-1], "weights": path.name,
                                 "sha256": file_sha256(path)})
    return path


def load_patch(path: str | Path) -> Tensor:
    """The patch (3, p, p) in [0, 1] saved at `path` by `save_patch` (a fresh copy; safetensors only, never a
    pickle); errors as `cleansweep.attacks.registry.cached_patch`, which the `badclip` trigger reads it through."""
    return cached_patch(path)[0].clone()


# ------------------------------------------------------------------------------------------------ from files
class PatchImages(NamedTuple):
    """Images to optimise a patch on: non-target (N, 3, S, S), target-class (M, 3, S, S) or None, templates, and
    the natural captions of the drawn target-class rows (empty for an eval folder: the templates serve)."""

    images: Tensor
    target_images: Tensor | None
    templates: list[str]
    captions: tuple[str, ...] = ()


def _read_some(paths: list[Path], n: int, generator: torch.Generator,
               image_size: int) -> tuple[Tensor | None, list[int]]:
    """(images, their indices into `paths`) of a seeded draw of up to n paths."""
    if not paths:
        return None, []
    pick = sorted(torch.randperm(len(paths), generator=generator)[:n].tolist())
    to_raw = raw_transform(image_size)
    out = []
    for i in pick:
        try:
            out.append(to_raw(open_rgb(paths[i])))
        except BadImage as e:
            raise UserError(f"cannot read image {paths[i]} ({e}); fix or remove it") from None
    return torch.stack(out), pick


def load_images(source: str | Path, image_size: int, target: str, *, max_images: int = 256, seed: int = 0,
                image_key: str = "image", caption_key: str = "caption") -> PatchImages:
    """Up to `max_images` non-target and target-class images (a seeded draw) from an eval folder or a CSV.

    Args:
        source: an ImageNet-style folder (classes from its subfolders, its own templates) or an image-caption CSV
            (target rows: captions naming the target as a word, whose captions are the natural target captions;
            the 80 CLIP templates).
        image_size: model resolution.
        target: target class name.
        max_images: at most this many images of each kind.
        seed: seed of the draw.
        image_key: CSV image column.
        caption_key: CSV caption column.
    """
    source = Path(source)
    if source.is_dir():
        folder = EvalFolder(source, image_size)
        label = folder.class_index(target)
        paths, is_target = [Path(p) for p, _ in folder.samples], [t == label for t in folder.targets]
        templates, captions = folder.templates, [None] * len(paths)
    else:
        df = read_pairs(source, image_key, caption_key)
        paths, captions = resolve_image_paths(source, df[image_key]), [str(c) for c in df[caption_key]]
        is_target, templates = [mentions(c, target) for c in captions], openai_templates()
    generator = torch.Generator().manual_seed(seed)
    images, _ = _read_some([p for p, t in zip(paths, is_target, strict=True) if not t], max_images, generator,
                           image_size)
    if images is None:
        raise UserError(f"{source} holds no image outside the target class {target!r}; pass other images")
    rows = [i for i, t in enumerate(is_target) if t]
    targets, pick = _read_some([paths[i] for i in rows], max_images, generator, image_size)
    natural = tuple(c for c in (captions[rows[i]] for i in pick) if c is not None)
    return PatchImages(images, targets, list(templates), natural)


def optimise_patch_for_checkpoint(checkpoint: str | Path, images: str | Path, target: str, out_path: str | Path, *,
                                  model_name: str | None = None, patch_size: int | None = None,
                                  location: str = "random", steps: int = 200, lr: float = 0.05, batch_size: int = 64,
                                  max_images: int = 256, triplet_weight: float = Objective().triplet_weight,
                                  margin: float = Objective().margin, eda_prob: float = Objective().eda_prob,
                                  aug_prob: float = Objective().aug_prob, seed: int = 0,
                                  device: str = "auto", image_key: str = "image", caption_key: str = "caption",
                                  image_size: int | None = None,
                                  extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Optimise a BadCLIP patch on a checkpoint and save it (`cleansweep poison --optimise-on`).

    Args:
        checkpoint: .safetensors or .pt model checkpoint (never unpickled as code).
        images: eval folder or image-caption CSV to optimise on (see `load_images`).
        target: target class name.
        out_path: where the patch goes (.safetensors; its card next to it).
        model_name: model config (default: from the checkpoint's card or its shapes).
        patch_size: patch side (default: `default_patch_size` of the model resolution, 16 px at 224).
        location, steps, lr, batch_size, seed: as `optimise_patch`.
        triplet_weight, margin, eda_prob, aug_prob: the `Objective` (defaults: the official patch's).
        max_images: images of each kind loaded (see `load_images`).
        device: "auto", "cpu" or "cuda".
        image_key, caption_key: CSV columns.
        image_size: the resolution the patch will be pasted at; must be the model's (checked before optimising).
        extra_meta: more facts for the card.

    Returns:
        The card: model, model_sha256, target, objective, steps, ..., triplet_weight, margin, eda_prob, aug_prob,
        num_captions, logit_scale, clean/initial/final_similarity (mean cosine between the images' embeddings,
        unpatched / with the random starting patch / with the optimised one, and the target's text embedding),
        patch_size, sha256. Cards written before the official objective lack `objective` (and hold
        `target_image_weight`); they still read.
    """
    bundle = load_checkpoint_model(checkpoint, model_name, model_flag="the model name (--optimise-model)")
    dev = resolve_device(device)
    if image_size is not None and image_size != bundle.image_size:
        raise UserError(f"image_size {image_size} differs from the checkpoint model's {bundle.image_size} px; drop "
                        f"--image-size or pass {bundle.image_size}")
    model = bundle.model.to(dev)
    pool = load_images(images, bundle.image_size, target, max_images=max_images, seed=seed, image_key=image_key,
                       caption_key=caption_key)
    p = int(patch_size or default_patch_size(bundle.image_size))
    objective = Objective(triplet_weight, margin, eda_prob, aug_prob)
    settings = {"location": location, "steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size}
    patch = optimise_patch(model, bundle.tokenizer, pool.images, target, pool.templates, patch_size=p,
                           normalize=(bundle.mean, bundle.std), target_images=pool.target_images,
                           captions=pool.captions, objective=objective, device=dev, **settings)
    text = target_text_features(model, bundle.tokenizer, target, pool.templates, dev)
    start = initial_patch(p, torch.Generator().manual_seed(seed))
    sims = {f"{k}_similarity": patched_similarity(model, pool.images, x, text, location=location, seed=seed,
                                                  normalize=(bundle.mean, bundle.std), device=dev)
            for k, x in (("clean", None), ("initial", start), ("final", patch))}
    meta = {"kind": "badclip_patch", "model": bundle.name, "checkpoint": str(checkpoint),
            "model_sha256": file_sha256(checkpoint), "target": target, "images": str(images),
            "num_images": len(pool.images), "num_target_images": 0 if pool.target_images is None else
            len(pool.target_images), "num_templates": len(pool.templates), "image_size": bundle.image_size,
            "objective": OBJECTIVE, **objective._asdict(), "num_captions": len(pool.captions) or len(pool.templates),
            "captions": "natural" if pool.captions else "templates",
            "logit_scale": float(model.logit_scale.detach()),
            **settings, **sims, "cleansweep_version": __version__, **dict(extra_meta or {})}
    save_patch(out_path, patch, meta)
    return read_card(out_path)


# ------------------------------------------------------------------------------------------------ poisoning
def _optimise_request(checkpoint: str | Path, images: str | Path, target: str, seed: int, patch_size: int | None,
                      location: str, optimise: Mapping[str, Any]) -> dict[str, Any]:
    """What makes a patch: an earlier patch whose card records the same request is reused (one made with another
    objective never is)."""
    images = Path(images)
    return json.loads(json.dumps({
        "model_sha256": file_sha256(checkpoint), "images": str(images),
        "images_sha256": file_sha256(images) if images.is_file() else None, "target": target, "seed": seed,
        "objective": OBJECTIVE,
        "patch_size": patch_size, "location": location, **dict(optimise)}, default=str))


def _adopt_patch(out_dir: Path, staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Move the patch (+ card) into the poisoned folder and point the manifest's `pattern` at it."""
    for name in (PATCH_FILE, card_path(PATCH_FILE).name):
        os.replace(staging / name, out_dir / name)
    manifest = {**manifest, "trigger_params": {**manifest["trigger_params"], "pattern": str(out_dir / PATCH_FILE)}}
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def poison_with_optimised_patch(csv: str | Path, out_dir: str | Path, *, checkpoint: str | Path, target: str,
                                images: str | Path | None = None, contaminate_set: bool = False,
                                image_size: int | None = None, seed: int = 0, patch_size: int | None = None,
                                location: str = "random", optimise: Mapping[str, Any] | None = None,
                                **poison_kwargs: Any) -> dict[str, Any]:
    """Optimise a BadCLIP patch on `checkpoint`, then poison `csv` with it into `out_dir` (which keeps the patch).

    The patch and its card end up as `out_dir/badclip_patch.safetensors` (+ .json); the manifest's
    `trigger_params` name that file and its sha256. Repeating an identical call returns the existing manifest
    without optimising again.

    Args:
        csv: input image-caption CSV.
        out_dir: output folder (see `poison_csv`); pass an absolute path (the manifest records the patch by it).
        checkpoint: model checkpoint to optimise on.
        target: target class.
        images: eval folder or CSV to optimise on (default: `csv`).
        contaminate_set: add poisons to a clean set (`contaminate`) instead of replacing rows (`poison_csv`).
        image_size: poisoning resolution; must be the model's (default).
        seed: seeds the optimisation and the poisoning.
        patch_size: patch side (default 16 px at 224, scaled).
        location: "random" or "fixed", for the optimisation and the poisoning.
        optimise: more `optimise_patch_for_checkpoint` arguments (model_name, steps, lr, device, ...).
        **poison_kwargs: more `poison_csv` arguments (num_poison, fraction, label_consistent, ...).
    """
    out_dir, images = Path(out_dir), images or csv
    optimise = dict(optimise or {})
    device = optimise.pop("device", "auto")
    request = _optimise_request(checkpoint, images, target, seed, patch_size, location, optimise)
    final = out_dir / PATCH_FILE
    poison = contaminate if contaminate_set else poison_csv
    common = {"attack": "badclip", "target": target, "seed": seed, "location": location, **poison_kwargs}
    columns = {k: poison_kwargs[k] for k in ("image_key", "caption_key") if k in poison_kwargs}
    card = read_card(final) if final.is_file() else {}
    if card.get("request") == request:
        return poison(csv, out_dir, image_size=image_size or card["image_size"], pattern=str(final), **common)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty (nor an identical earlier result); pass a new --out "
                        "folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.badclip-", dir=out_dir.parent))
    try:
        card = optimise_patch_for_checkpoint(checkpoint, images, target, staging / PATCH_FILE, patch_size=patch_size,
                                             location=location, seed=seed, device=device, image_size=image_size,
                                             extra_meta={"request": request}, **columns, **optimise)
        manifest = poison(csv, out_dir, image_size=card["image_size"], pattern=str(staging / PATCH_FILE), **common)
        return _adopt_patch(out_dir, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
