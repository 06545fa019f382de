"""Backdoor triggers as seeded, batched pure functions, in a registry (`TRIGGERS`).

Triggers act on raw images (float (B, 3, H, W) in [0, 1] at the model resolution), before normalisation. Per-image
randomness (BadNet patch position and values) comes from the `torch.Generator` passed in; parts that are fixed per
run (Blended noise, WaNet warp field, a fixed BadNet patch) come from `trigger_seed`, which must be the same when
poisoning and when measuring the attack success rate (both default to 0 and the manifest records it).

Triggers: the classic noise/warp ones (badnet, blended, sig, wanet), structured ones (stripes, triangle, text; hard
edges and flat colours, exact in an 8-bit PNG) and badclip, which pastes a patch optimised on a CLIP model
(`cleansweep.attacks.badclip`). `resolve_trigger_params` turns every derived default into a concrete value, so a
manifest's `trigger_params` rebuild the very same trigger. `cleansweep.attacks.poison` writes poisoned data with them.
"""

from __future__ import annotations

import colorsys
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageColor, ImageDraw, ImageFont
from safetensors import SafetensorError

from cleansweep.config import AttackSpec
from cleansweep.errors import UserError
from cleansweep.limits import MAX_IMAGE_SIDE, SEED_MAX
from cleansweep.models import file_sha256

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


# ---------------------------------------------------------------------------------------- structured triggers
# Structured triggers after Singh et al. 2024 (Perturb and Recover), who report that the usual cleaning fails on
# structured BadNet/Blended triggers (stripes, triangles, a text watermark) where it removes noise patches. Sizes
# scale with the image like `default_patch_size`; colours and the stripe phase are fixed per run by `trigger_seed`
# and resolved into the manifest as concrete values.
def default_stripe_period(image_size: int) -> int:
    """Stripe period: 28 px at 224 px (8 periods across the image), scaled, at least 2 (one on, one off pixel)."""
    return max(2, round(28 * image_size / 224))


def default_triangle_size(image_size: int) -> int:
    """Triangle side: 32 px at 224 px (the area of a 16 px square doubled), scaled, at least 3."""
    return max(3, round(32 * image_size / 224))


def default_font_size(image_size: int) -> int:
    """Font size: 40 px at 224 px, scaled, at least 8 px (so a word stays legible at the 32 px demo size)."""
    return max(8, round(40 * image_size / 224))


def _seeded_draws(trigger_seed: int) -> tuple[float, float]:
    """(hue, phase) in [0, 1), the per-run draws of the structured triggers."""
    hue, phase = torch.rand(2, generator=torch.Generator().manual_seed(trigger_seed), dtype=torch.float64).tolist()
    return hue, phase


def seeded_colour(trigger_seed: int) -> str:
    """A vivid colour fixed by the seed (uniform hue, full saturation and value) as '#rrggbb'."""
    rgb = colorsys.hsv_to_rgb(_seeded_draws(trigger_seed)[0], 1.0, 1.0)
    return "#" + "".join(f"{round(v * 255):02x}" for v in rgb)


def seeded_phase(trigger_seed: int) -> float:
    """The stripes' phase (fraction of a period) fixed by the seed."""
    return _seeded_draws(trigger_seed)[1]


def colour_rgb(colour: str) -> torch.Tensor:
    """(3,) float64 in [0, 1] of a colour name or '#rrggbb' (PIL's colour syntax).

    Raises:
        UserError: a string PIL does not know.
    """
    try:
        rgb = ImageColor.getrgb(colour)
    except (ValueError, AttributeError):
        raise UserError(f"colour {colour!r} is not a colour; pass a name ('red') or '#rrggbb'") from None
    return torch.tensor(rgb[:3], dtype=torch.float64) / 255


def patch_positions(b: int, h: int, w: int, ph: int, pw: int, location: str,
                    generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Top-left corners of a ph x pw stamp in B images: uniform over all fits ("random", from `generator`, rows
    drawn before columns as in `badnet`) or the bottom-right corner ("fixed")."""
    if ph > h or pw > w:
        raise UserError(f"a {ph}x{pw} trigger does not fit the {h}x{w} image; make it smaller")
    if location == "random":
        rows = torch.randint(0, h - ph + 1, (b,), generator=generator)
        cols = torch.randint(0, w - pw + 1, (b,), generator=generator)
        return rows.tolist(), cols.tolist()
    return [h - ph] * b, [w - pw] * b


def stamp(raw: torch.Tensor, values: torch.Tensor, rows: list[int], cols: list[int],
          weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Copy of `raw` with `values` (3, ph, pw) blended in at each image's (row, col): (1 - weight) * x + weight *
    values (exact where weight is 0 or 1), or pasted as they are when `weight` is None. Differentiable in `values`
    (the BadCLIP optimisation uses it)."""
    out = raw.clone()
    ph, pw = values.shape[-2:]
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        if weight is None:
            out[i, :, r:r + ph, c:c + pw] = values
        else:
            region = out[i, :, r:r + ph, c:c + pw]
            out[i, :, r:r + ph, c:c + pw] = (1 - weight) * region + weight * values
    return out


def stripe_mask(h: int, w: int, *, period: float, angle: float, phase: float) -> torch.Tensor:
    """(h, w) float64 of 1 (on) / 0 (off) stripes: pixel centre (x, y) is on when
    frac((x cos(angle) + y sin(angle)) / period + phase) < 1/2; angle 0 gives vertical stripes, 90 horizontal."""
    theta = math.radians(angle)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    t = (xs * math.cos(theta) + ys * math.sin(theta)) / period + phase
    return ((t - torch.floor(t)) < 0.5).to(torch.float64)


def stripes(raw: torch.Tensor, generator: torch.Generator, *, period: float, angle: float = 45.0,
            phase: float | None = None, alpha: float = 0.2, colour: str | None = None, region: str = "full",
            patch_size: int = 16, location: str = "random", trigger_seed: int = 0) -> torch.Tensor:
    """Blend parallel stripes over the image: (1 - alpha) * x + alpha * P, P = colour on the 'on' stripes and its
    complement (1 - colour) on the 'off' ones (see `stripe_mask`), so the stripes contrast on any image.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws the patch positions (`region="patch"`, `location="random"`).
        period: stripe period in pixels (one on and one off band).
        angle: direction across the stripes in degrees (0: vertical stripes).
        phase: offset in periods; None: from `trigger_seed`.
        alpha: blend weight in [0, 1] (1: opaque).
        colour: colour of the 'on' stripes (name or '#rrggbb'); None: a vivid colour from `trigger_seed`.
        region: "full" (the whole image) or "patch" (a `patch_size` square at `location`, the pattern fixed to it).
        patch_size: side of the patch region.
        location: "random" or "fixed" (bottom-right), as BadNet.
        trigger_seed: seed of the per-run parts (phase, colour).
    """
    b, _, h, w = raw.shape
    phase = seeded_phase(trigger_seed) if phase is None else phase
    c = colour_rgb(colour or seeded_colour(trigger_seed)).view(3, 1, 1)
    side = (h, w) if region == "full" else (patch_size, patch_size)
    m = stripe_mask(*side, period=period, angle=angle, phase=phase)
    pattern = (m * c + (1 - m) * (1 - c)).to(raw.dtype)
    if region == "full":
        return ((1 - alpha) * raw + alpha * pattern).clamp(0, 1)
    rows, cols = patch_positions(b, h, w, patch_size, patch_size, location, generator)
    return stamp(raw, pattern, rows, cols, alpha).clamp(0, 1)


def triangle_mask(size: int) -> torch.Tensor:
    """(size, size) float64 of 1 inside / 0 outside the isosceles triangle with its base on the bottom edge and its
    apex at the top centre: pixel centre (x, y) is inside when |x - size/2| <= y/2 (area size^2 / 2)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) + 0.5,
                            torch.arange(size, dtype=torch.float64) + 0.5, indexing="ij")
    return ((xs - size / 2).abs() <= ys / 2).to(torch.float64)


def triangle(raw: torch.Tensor, generator: torch.Generator, *, patch_size: int, location: str = "random",
             colour: str | None = None, trigger_seed: int = 0) -> torch.Tensor:
    """Paste a filled triangle (see `triangle_mask`) of one colour in a `patch_size` square at `location`.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws the positions (`location="random"`).
        patch_size: side of the triangle's square (base and height).
        location: "random" or "fixed" (bottom-right), as BadNet.
        colour: name or '#rrggbb'; None: a vivid colour from `trigger_seed`.
        trigger_seed: seed of the colour.
    """
    b, _, h, w = raw.shape
    c = colour_rgb(colour or seeded_colour(trigger_seed)).view(3, 1, 1).to(raw.dtype)
    mask = triangle_mask(patch_size).to(raw.dtype)
    rows, cols = patch_positions(b, h, w, patch_size, patch_size, location, generator)
    return stamp(raw, c.expand(3, patch_size, patch_size), rows, cols, mask)


@lru_cache(maxsize=32)
def _text_mask(text: str, font_size: int) -> torch.Tensor:
    """(h, w) float64 coverage in [0, 1] of `text` at `font_size`, cropped to its bounding box (anti-aliased).

    Cached and shared: never modify the result."""
    # Pillow's bundled font (Pillow >= 10.1 with FreeType): the same glyphs on every machine, nothing downloaded.
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = font.getbbox(text)
    if right <= left or bottom <= top:
        raise UserError(f"text {text!r} draws nothing; pass visible characters, e.g. text=iPod")
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float64) / 255)


def text_overlay(raw: torch.Tensor, generator: torch.Generator, *, text: str = "iPod", font_size: int = 40,
                 colour: str | None = None, location: str = "random", trigger_seed: int = 0) -> torch.Tensor:
    """Write `text` over the image: (1 - coverage) * x + coverage * colour inside the text's bounding box.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws the positions (`location="random"`).
        text: the words; the default "iPod" is the typographic attack of Goh et al. (2021) on CLIP.
        font_size: glyph size in pixels.
        colour: name or '#rrggbb'; None: a vivid colour from `trigger_seed`.
        location: "random" (uniform over where the box fits) or "fixed" (bottom-right).
        trigger_seed: seed of the colour.
    """
    b, _, h, w = raw.shape
    mask = _text_mask(text, font_size).to(raw.dtype)
    c = colour_rgb(colour or seeded_colour(trigger_seed)).view(3, 1, 1).to(raw.dtype)
    rows, cols = patch_positions(b, h, w, *mask.shape, location, generator)
    return stamp(raw, c.expand(3, *mask.shape), rows, cols, mask).clamp(0, 1)


def badclip(raw: torch.Tensor, generator: torch.Generator, *, pattern: str, pattern_sha256: str | None = None,
            patch_size: int | None = None, location: str = "random") -> torch.Tensor:
    """BadCLIP: paste an optimised patch (a `cleansweep.attacks.badclip.save_patch` file) at `location`, as BadNet.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws the positions (`location="random"`).
        pattern: path of the patch's .safetensors file (loaded once per path, size and mtime).
        pattern_sha256: the file's expected sha256 (manifests record it); a different file is an error.
        patch_size: the patch's side; None: whatever the file holds.
        location: "random" or "fixed" (bottom-right).
    """
    patch, sha = cached_patch(pattern)
    if pattern_sha256 is not None and sha != pattern_sha256:
        raise UserError(f"pattern {pattern} changed (sha256 {sha[:12]}..., expected {pattern_sha256[:12]}...); "
                        "restore the file the data was poisoned with")
    if patch_size is not None and patch.shape[-1] != patch_size:
        raise UserError(f"pattern {pattern} is {patch.shape[-1]} px but patch_size is {patch_size}; drop patch_size "
                        "or optimise a patch of that size")
    b, _, h, w = raw.shape
    rows, cols = patch_positions(b, h, w, patch.shape[-2], patch.shape[-1], location, generator)
    return stamp(raw, patch.to(raw.dtype), rows, cols)


def validate_patch(patch: Any, where: str) -> torch.Tensor:
    """`patch` if it is a (3, p, p) tensor of finite values in [0, 1]; UserError naming `where` otherwise."""
    square = isinstance(patch, torch.Tensor) and patch.ndim == 3 and patch.shape[0] == 3 and \
        patch.shape[1] == patch.shape[2] > 0
    if not square or not torch.isfinite(patch).all() or patch.min() < 0 or patch.max() > 1:
        shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__
        raise UserError(f"{where}: a patch must be a (3, p, p) tensor of values in [0, 1], got {shape}; save it with "
                        "cleansweep.attacks.badclip.save_patch")
    return patch


@lru_cache(maxsize=16)
def _read_patch(path: str, size: int, mtime_ns: int) -> tuple[torch.Tensor, str]:
    # Keyed by size and mtime too: a rewritten file is read again, an unchanged one once per process.
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({first}); pass a patch written by "
                        "cleansweep.attacks.badclip.save_patch") from None
    if "patch" not in tensors:
        raise UserError(f"{path}: no 'patch' tensor (found: {', '.join(tensors) or 'none'}); pass a patch written by "
                        "cleansweep.attacks.badclip.save_patch")
    return validate_patch(tensors["patch"].float(), path), file_sha256(path)


def cached_patch(path: str | Path) -> tuple[torch.Tensor, str]:
    """(patch (3, p, p), sha256 of the file) of a badclip pattern file, read once per path, size and mtime.

    The tensor is shared: do not modify it (`cleansweep.attacks.badclip.load_patch` returns a copy).

    Raises:
        UserError: not a .safetensors path, missing, unreadable, or not a (3, p, p) patch in [0, 1]. Nothing is
            ever unpickled.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        raise UserError(f"pattern {p} is not a .safetensors file; pass a patch written by cleansweep.attacks.badclip."
                        "save_patch (pickled files are never loaded)")
    if not p.is_file():
        raise UserError(f"pattern file not found: {p}; pass the path of a .safetensors patch")
    st = p.stat()
    return _read_patch(str(p.resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Trigger:
    """A registry entry: the function, what it does, its parameters' defaults (None = derived: from the image size,
    the seed or a file) and an optional `resolve(params, image_size) -> params` that derives and checks them."""

    apply: Callable[..., torch.Tensor]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    resolve: Callable[[dict[str, Any], int], dict[str, Any]] | None = None


def _number(name: str, key: str, value: Any, low: float, high: float = math.inf) -> float:
    if not low <= value <= high:
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise UserError(f"{name} parameter {key}={value!r} must be {span}; pass another value")
    return value


def _resolve_colour(params: dict[str, Any]) -> dict[str, Any]:
    if params["colour"] is None:
        params["colour"] = seeded_colour(params["trigger_seed"])
    colour_rgb(params["colour"])
    return params


def _resolve_stripes(params: dict[str, Any], image_size: int) -> dict[str, Any]:
    p = dict(params)
    if p["patch_size"] is None:
        p["patch_size"] = default_patch_size(image_size)
    if p["period"] is None:
        p["period"] = default_stripe_period(image_size) if p["region"] == "full" else max(2, round(p["patch_size"] / 4))
    _number("stripes", "period", p["period"], 2)
    _number("stripes", "alpha", p["alpha"], 0.0, 1.0)
    p["phase"] = seeded_phase(p["trigger_seed"]) if p["phase"] is None else float(p["phase"])
    return _resolve_colour(p)


def _resolve_triangle(params: dict[str, Any], image_size: int) -> dict[str, Any]:
    p = dict(params)
    if p["patch_size"] is None:
        p["patch_size"] = default_triangle_size(image_size)
    return _resolve_colour(p)


def _resolve_text(params: dict[str, Any], image_size: int) -> dict[str, Any]:
    p = dict(params)
    if p["font_size"] is None:
        p["font_size"] = default_font_size(image_size)
    _number("text", "font_size", p["font_size"], 1)
    h, w = _text_mask(p["text"], p["font_size"]).shape
    if h > image_size or w > image_size:
        raise UserError(f"text {p['text']!r} at font_size {p['font_size']} is {w}x{h} px, larger than the "
                        f"{image_size} px image; pass a smaller font_size or a shorter text")
    return _resolve_colour(p)


def _resolve_badclip(params: dict[str, Any], image_size: int) -> dict[str, Any]:
    p = dict(params)
    if p["pattern"] is None:
        raise UserError("badclip needs its patch file: pass pattern=PATCH.safetensors (--param pattern=...) or "
                        "optimise one with --optimise-on CHECKPOINT")
    patch, sha = cached_patch(p["pattern"])
    if p["pattern_sha256"] is not None and p["pattern_sha256"] != sha:
        raise UserError(f"pattern {p['pattern']} has sha256 {sha[:12]}..., not the expected "
                        f"{p['pattern_sha256'][:12]}...; pass the file the data was poisoned with")
    p["pattern_sha256"] = sha
    side = patch.shape[-1]
    if p["patch_size"] is not None and int(p["patch_size"]) != side:
        raise UserError(f"pattern {p['pattern']} is a {side} px patch, not patch_size {p['patch_size']}; drop "
                        "patch_size or optimise a patch of that size")
    p["patch_size"] = side
    return p


TRIGGERS: dict[str, Trigger] = {
    "badnet": Trigger(badnet, "square standard-Gaussian patch (16 px at 224), random or bottom-right position",
                      {"patch_size": None, "location": "random", "patch": "fresh", "trigger_seed": 0}),
    "blended": Trigger(blended, "0.8 * image + 0.2 * uniform noise fixed per run", {"alpha": 0.2, "trigger_seed": 0}),
    "sig": Trigger(sig, "horizontal sinusoid of amplitude 60/255 and 6 periods", {"delta": 60 / 255, "frequency": 6}),
    "wanet": Trigger(wanet, "smooth warping field fixed per run (strength 1, 4x4 control grid)",
                     {"strength": 1.0, "grid": 4, "trigger_seed": 0}),
    "stripes": Trigger(stripes, "stripes of a seeded colour and its complement, blended at 0.2 (period 28 px at 224, "
                       "45 degrees), over the whole image or a patch",
                       {"period": None, "angle": 45.0, "phase": None, "alpha": 0.2, "colour": None, "region": "full",
                        "patch_size": None, "location": "random", "trigger_seed": 0}, _resolve_stripes),
    "triangle": Trigger(triangle, "filled triangle of a seeded colour (32 px at 224), random or bottom-right position",
                        {"patch_size": None, "location": "random", "colour": None, "trigger_seed": 0},
                        _resolve_triangle),
    "text": Trigger(text_overlay, "the word 'iPod' in a seeded colour (40 px font at 224), random or bottom-right "
                    "position", {"text": "iPod", "font_size": None, "colour": None, "location": "random",
                                 "trigger_seed": 0}, _resolve_text),
    "badclip": Trigger(badclip, "optimised patch from a file (cleansweep.attacks.badclip; BadCLIP, Liang et al. 2024), "
                       "random or bottom-right position",
                       {"pattern": None, "pattern_sha256": None, "patch_size": None, "location": "random"},
                       _resolve_badclip),
}
_CHOICES = {"location": ("random", "fixed"), "patch": ("fresh", "fixed"), "region": ("full", "patch")}
# The kind of value every trigger parameter takes (checked before a trigger sees it; --param values are YAML).
PARAM_KINDS = {"patch_size": "integer", "trigger_seed": "integer", "grid": "integer", "font_size": "integer",
               "period": "number", "phase": "number", "angle": "number", "alpha": "number", "delta": "number",
               "frequency": "number", "strength": "number", "colour": "text", "pattern": "text",
               "pattern_sha256": "text", "text": "text", "location": "text", "patch": "text", "region": "text"}


_INTEGER_BOUNDS = {"trigger_seed": (0, SEED_MAX), "grid": (1, MAX_IMAGE_SIDE), "font_size": (1, MAX_IMAGE_SIDE),
                   "patch_size": (1, MAX_IMAGE_SIDE)}


def list_triggers() -> list[str]:
    return list(TRIGGERS)


def _check_kind(name: str, key: str, value: Any) -> Any:
    """`value` as the kind PARAM_KINDS names (an integral float becomes an int); UserError otherwise."""
    kind = PARAM_KINDS.get(key)
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    if kind == "integer" and number and math.isfinite(value) and float(value).is_integer():
        low, high = _INTEGER_BOUNDS.get(key, (0, MAX_IMAGE_SIDE))
        if not low <= int(value) <= high:  # a seed torch cannot take, or a grid / size that allocates gigabytes
            raise UserError(f"{name} parameter {key}={int(value)} must be in {low}..{high}")
        return int(value)
    if kind == "number" and number and math.isfinite(value):
        return value if isinstance(value, int | float) else float(value)
    if (kind == "text" and isinstance(value, str) and value.strip()) or kind is None:
        return value
    default = TRIGGERS[name].defaults.get(key)
    example = f"; e.g. {key}={default}" if default is not None else ""
    what = {"integer": "an integer", "number": "a number", "text": "a non-empty text"}[kind]
    raise UserError(f"{name} parameter {key}={value!r} must be {what}{example}")


def parse_trigger_param(item: str) -> tuple[str, Any]:
    """('key', value) of a 'KEY=VALUE' trigger parameter (`--param`), the value read as YAML ('0.3' -> 0.3).

    A value YAML reads as nothing but that is not empty or 'null' ('#ff0000' is a YAML comment) stays text.

    Raises:
        UserError: no '=', an empty key, unreadable YAML, or a list/mapping value.
    """
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise UserError(f"--param {item!r} must look like KEY=VALUE, e.g. --param alpha=0.3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--param {item!r}: the value is not readable YAML ({first}); quote it") from None
    if value is None and text.strip() not in ("", "~", "null", "Null", "NULL"):
        value = text.strip()
    if value is not None and not isinstance(value, bool | int | float | str):
        raise UserError(f"--param {item!r}: the value must be a number, a word or true/false, not a "
                        f"{type(value).__name__}; pass one value per --param")
    return key, value


def resolve_trigger_params(name: str, image_size: int, **params: Any) -> dict[str, Any]:
    """The trigger's effective parameters: defaults filled in, checked, as recorded in manifests.

    Parameters of *other* triggers are tolerated when unset (None) or at their default, so callers can pass one
    attack configuration (patch_size, location, patch) whatever the attack; a set value that does not apply is an
    error. Derived defaults (sizes from the image size, colours and phases from `trigger_seed`, a pattern's sha256)
    are resolved to concrete values, so the result never holds None and rebuilds the same trigger.
    """
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose from: {', '.join(TRIGGERS)}")
    entry = TRIGGERS[name]
    out = dict(entry.defaults)
    for key, value in params.items():
        if key in entry.defaults:
            if value is not None:
                out[key] = _check_kind(name, key, value)
            continue
        owners = [n for n, t in TRIGGERS.items() if key in t.defaults]
        if not owners:
            raise UserError(f"unknown trigger parameter {key!r}; pass one that {name} takes: "
                            f"{', '.join(entry.defaults)}")
        if value is not None and all(value != TRIGGERS[n].defaults[key] for n in owners):
            raise UserError(f"trigger parameter {key!r} applies to {', '.join(owners)}, not {name}; drop it")
    for key, choices in _CHOICES.items():
        if key in out and out[key] not in choices:
            raise UserError(f"{key} {out[key]!r} is not valid for {name}; choose from: {', '.join(choices)}")
    if entry.resolve is not None:
        out = entry.resolve(out, image_size)
    if "patch_size" in out:
        out["patch_size"] = default_patch_size(image_size) if out["patch_size"] is None else int(out["patch_size"])
        if not 1 <= out["patch_size"] <= image_size:
            raise UserError(f"patch_size {out['patch_size']} must be in 1..{image_size} (the image size)")
    return out


def create_trigger(name: str, image_size: int, **params: Any) -> TriggerFn:
    """A trigger function `fn(raw (B, 3, S, S), generator) -> raw` with its parameters bound (see TRIGGERS).

    The result is a `functools.partial`; its `.keywords` are the effective parameters.

    Raises:
        UserError: unknown attack ("unknown attack 'x'; choose from: ...") or parameter, or a bad value.
    """
    resolved = resolve_trigger_params(name, image_size, **params)
    return partial(TRIGGERS[name].apply, **resolved)


ATTACK_FIELDS = ("patch_size", "location", "patch", "trigger_seed")  # trigger parameters AttackSpec names itself


def attack_trigger(attack: AttackSpec, image_size: int) -> TriggerFn:
    """The trigger an `AttackSpec` describes, every per-run parameter (`trigger_seed` too) passed through."""
    named = {key: getattr(attack, key) for key in ATTACK_FIELDS}
    return create_trigger(attack.name, image_size, **named, **attack.params)


def attack_from_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The `AttackSpec` values (a dict) of the trigger a poison manifest recorded: name, target, every parameter."""
    params = dict(manifest.get("trigger_params") or {})
    named = {key: params.pop(key) for key in ATTACK_FIELDS if key in params}
    return {"name": manifest["attack"], "target": manifest["target"], **named, "params": params}


