"""Image I/O shared by datasets, evaluation folders and poisoning: force-loaded RGB and the model-size raw view."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from cleansweep import limits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """An image file that is missing or cannot be decoded (the caller decides: skip it or raise a UserError)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image fully decoded as RGB.

    Pillow opens lazily and reports a truncated file only when the pixels are read, so `load()` is forced here:
    a corrupt image fails now, at a known row, never later inside a transform.

    Raises:
        BadImage: the file is missing, unreadable, not an image, truncated, larger than `limits.MAX_IMAGE_PIXELS`
            (checked on its header, before decoding) or of a bit depth with no known white level (32-bit, float).
    """
    limit = limits.MAX_IMAGE_PIXELS
    too_big = "allowed (cleansweep.limits.MAX_IMAGE_PIXELS): downscale it"
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP and decodes up to 179 MP; our bound, checked on the header before any pixel is
            # decoded, replaces the warning (Pillow's own error above 179 MP stays).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > limit:
                    raise BadImage(f"it declares {width} x {height} pixels, more than the {limit:,} {too_big}")
                im.load()
                return _to_rgb(im)
    except Image.DecompressionBombError:
        raise BadImage(f"it declares more than the {limit:,} pixels {too_big}") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise BadImage(reason) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB by bit depth: Pillow's convert('RGB') clips 16-bit grey ('I;16', or 'I' from PNG/PPM) at 255, so those are
    scaled by 255/65535 here; 32-bit integer or float pixels have no known white level and are refused."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PNG", "PPM")):
        grey = np.asarray(im, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("I", "F"):
        raise BadImage(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels have no known white level; "
                       "save it as an 8- or 16-bit image")
    return im.convert("RGB")


def raw_transform(image_size: int) -> transforms.Compose:
    """PIL image -> raw float tensor (3, S, S) in [0, 1] at the model resolution, not normalised.

    Same geometry as open_clip's eval preprocess (shorter side to S bicubic, center crop), so triggers applied to
    this raw view land where the model sees them; normalisation comes after the trigger. An image already S x S
    passes through unresampled (torchvision's resize returns it unchanged).
    """
    return transforms.Compose([resize_center_crop_transform(image_size), transforms.ToTensor()])


def resize_center_crop_transform(image_size: int) -> transforms.Compose:
    """Shorter side to `image_size` (bicubic), then a center crop to a square, on PIL images."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
    ])


def to_uint8_image(raw: torch.Tensor) -> Image.Image:
    """Raw (3, H, W) in [0, 1] -> 8-bit RGB PIL image (round to nearest, the inverse of ToTensor up to 1/510)."""
    array = (raw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
