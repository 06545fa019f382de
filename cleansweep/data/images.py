"""Image I/O shared by datasets, evaluation folders and poisoning: force-loaded RGB and the model-size raw view."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """An image file that is missing or cannot be decoded (the caller decides: skip it or raise a UserError)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image fully decoded as RGB.

    Pillow opens lazily and reports a truncated file only when the pixels are read, so `load()` is forced here:
    a corrupt image fails now, at a known row, never later inside a transform.

    Raises:
        BadImage: the file is missing, unreadable, not an image, truncated or a decompression bomb.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise BadImage(reason) from None


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
