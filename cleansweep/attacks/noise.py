"""The classic noise and warp triggers (badnet, blended, sig, wanet), each with its registry entry.

Triggers act on raw images (float (B, 3, H, W) in [0, 1] at the model resolution), before normalisation. Per-image
randomness (BadNet patch position and values) comes from the `torch.Generator` passed in; parts that are fixed per
run (Blended noise, WaNet warp field, a fixed BadNet patch) come from `trigger_seed`, which must be the same when
poisoning and when measuring the attack success rate (both default to 0 and the manifest records it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from cleansweep.attacks.params import LOCATION, NUMBER, SEED, SIZE, Kind, Trigger
from cleansweep.errors import UserError


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


ENTRIES = (
    Trigger("badnet", badnet, "square standard-Gaussian patch (16 px at 224), random or bottom-right position",
            {"patch_size": None, "location": "random", "patch": "fresh", "trigger_seed": 0},
            {"patch_size": SIZE, "location": LOCATION, "patch": Kind("text", choices=("fresh", "fixed")),
             "trigger_seed": SEED}),
    Trigger("blended", blended, "0.8 * image + 0.2 * uniform noise fixed per run", {"alpha": 0.2, "trigger_seed": 0},
            {"alpha": NUMBER, "trigger_seed": SEED}),
    Trigger("sig", sig, "horizontal sinusoid of amplitude 60/255 and 6 periods", {"delta": 60 / 255, "frequency": 6},
            {"delta": NUMBER, "frequency": NUMBER}),
    Trigger("wanet", wanet, "smooth warping field fixed per run (strength 1, 4x4 control grid)",
            {"strength": 1.0, "grid": 4, "trigger_seed": 0}, {"strength": NUMBER, "grid": SIZE, "trigger_seed": SEED}),
)
