"""Structured triggers (stripes, triangle, text), each with its registry entry, and the stamping helpers that
paste a patch (`patch_positions`, `stamp`; the BadCLIP patch uses them too).

After Singh et al. 2024 (Perturb and Recover), who report that the usual cleaning fails on structured BadNet/Blended
triggers (stripes, triangles, a text watermark) where it removes noise patches. Hard edges and flat colours: exact
in an 8-bit PNG. Sizes scale with the image like `default_patch_size`; colours and the stripe phase are fixed per
run by `trigger_seed` and resolved into the manifest as concrete values.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from cleansweep.attacks.params import LOCATION, NUMBER, SEED, SIZE, TEXT, Kind, Trigger, check_range, default_patch_size
from cleansweep.errors import UserError


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
    check_range("stripes", "period", p["period"], 2)
    check_range("stripes", "alpha", p["alpha"], 0.0, 1.0)
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
    check_range("text", "font_size", p["font_size"], 1)
    h, w = _text_mask(p["text"], p["font_size"]).shape
    if h > image_size or w > image_size:
        raise UserError(f"text {p['text']!r} at font_size {p['font_size']} is {w}x{h} px, larger than the "
                        f"{image_size} px image; pass a smaller font_size or a shorter text")
    return _resolve_colour(p)


ENTRIES = (
    Trigger("stripes", stripes, "stripes of a seeded colour and its complement, blended at 0.2 (period 28 px at 224, "
            "45 degrees), over the whole image or a patch",
            {"period": None, "angle": 45.0, "phase": None, "alpha": 0.2, "colour": None, "region": "full",
             "patch_size": None, "location": "random", "trigger_seed": 0},
            {"period": NUMBER, "angle": NUMBER, "phase": NUMBER, "alpha": NUMBER, "colour": TEXT,
             "region": Kind("text", choices=("full", "patch")), "patch_size": SIZE, "location": LOCATION,
             "trigger_seed": SEED}, _resolve_stripes),
    Trigger("triangle", triangle, "filled triangle of a seeded colour (32 px at 224), random or bottom-right position",
            {"patch_size": None, "location": "random", "colour": None, "trigger_seed": 0},
            {"patch_size": SIZE, "location": LOCATION, "colour": TEXT, "trigger_seed": SEED}, _resolve_triangle),
    Trigger("text", text_overlay, "the word 'iPod' in a seeded colour (40 px font at 224), random or bottom-right "
            "position", {"text": "iPod", "font_size": None, "colour": None, "location": "random", "trigger_seed": 0},
            {"text": TEXT, "font_size": SIZE, "colour": TEXT, "location": LOCATION, "trigger_seed": SEED},
            _resolve_text),
)
