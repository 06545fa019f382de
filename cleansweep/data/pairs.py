"""Image-caption CSV datasets in the CleanCLIP layout (`image,caption` columns, image paths relative to the CSV).

Every row yields its own image, caption and index together, so a bad image can only remove its row: images and
captions can never shift against each other. The SSL views (CleanCLIP's in-modal loss) are computed on the fly from
the same row with randomness seeded by (seed, epoch, index), so they are reproducible with any number of workers.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from cleansweep.data.images import BadImage, open_rgb
from cleansweep.errors import UserError

BAD_IMAGE_POLICIES = ("skip", "fail")


def read_pairs(csv_path: str | Path, image_key: str = "image", caption_key: str = "caption") -> pd.DataFrame:
    """Read and validate an image-caption CSV.

    All columns are read as text (a caption "123" stays a string; an empty cell stays ""). Row numbers in messages
    are 0-based data rows (the header is not counted), the same numbers as `index` in batches and poison manifests.

    Raises:
        UserError: missing file, unreadable or empty CSV, missing columns, empty image path or caption.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"image-caption CSV not found: {path}; pass the path of an existing CSV file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty; write a header '{image_key},{caption_key}' and one row per pair") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable CSV ({_csv_problem(e)}); fix the file (UTF-8, comma-separated)") \
            from None
    twice = [k for k in (image_key, caption_key) if f"{k}.1" in df.columns and _header_count(path, k) > 1]
    if twice:  # pandas keeps the first and renames the others `KEY.1`: which one was meant is a guess
        raise UserError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more than once in its header "
                        "(line 1); rename or remove the extra column(s)")
    missing = [k for k in (image_key, caption_key) if k not in df.columns]
    if missing:
        # The header is not echoed: a file given here by mistake (a token, a key) would be printed back.
        raise UserError(f"{path}: missing column(s) {', '.join(map(repr, missing))} in its header (line 1, "
                        f"{len(df.columns)} column(s)); rename the columns or set the image/caption keys "
                        f"(--image-key/--caption-key)")
    if len(df) == 0:
        raise UserError(f"{path} has a header but no rows; add one '{image_key},{caption_key}' row per pair")
    for key, what in ((image_key, "image path"), (caption_key, "caption")):
        blank = np.flatnonzero(df[key].str.strip().eq("").to_numpy())
        if len(blank):
            more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
            raise UserError(f"{path}: row {blank[0]} (0-based, header not counted) has an empty {what}{more}; "
                            f"fill it in or remove the row")
    return df


def _csv_problem(err: Exception) -> str:
    """Where a CSV failed to parse, by line or byte offset only: parser messages can quote the file's text."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 at byte {err.start}"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    where = re.search(r"\b(line|row) (\d+)", str(err))
    return f"{type(err).__name__} at {where.group(1)} {where.group(2)}" if where else type(err).__name__


def resolve_image_paths(csv_path: str | Path, relative: pd.Series) -> list[Path]:
    """Image paths as written in the CSV, resolved against the CSV's folder (absolute paths stay absolute)."""
    root = Path(csv_path).resolve().parent
    return [root / p for p in relative]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one row in one epoch, independent of worker count and iteration order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class ImageCaptionDataset(Dataset):
    """Pairs from a CSV; items are training dicts (`image`, `text`, `index`, optionally `image_aug`, `text_aug`).

    Args:
        csv_path: CSV with an image-path column and a caption column (paths relative to the CSV).
        transform: PIL image -> normalised tensor (the model's preprocess).
        tokenize: list[str] -> LongTensor (N, L) (open_clip's tokenizer).
        image_key: image column name.
        caption_key: caption column name.
        on_bad_image: "skip" (the item is None; `collate_skip` drops and counts it) or "fail" (UserError naming
            the row and path).
        ssl_image_transform: PIL image -> tensor for the augmented image view (e.g. `augment.ssl_image_transform`).
        ssl_text_fn: (caption, random.Random) -> caption for the augmented text view (e.g. `augment.eda`).
        seed: base seed of all per-item randomness (transforms and SSL views), combined with epoch and index.
    """

    def __init__(
        self,
        csv_path: str | Path,
        transform: Callable[[Any], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        *,
        image_key: str = "image",
        caption_key: str = "caption",
        on_bad_image: str = "skip",
        ssl_image_transform: Callable[[Any], torch.Tensor] | None = None,
        ssl_text_fn: Callable[[str, random.Random], str] | None = None,
        seed: int = 0,
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image {on_bad_image!r} is not a policy; choose from: "
                            f"{', '.join(BAD_IMAGE_POLICIES)}")
        if (ssl_image_transform is None) != (ssl_text_fn is None):
            raise ValueError("pass both ssl_image_transform and ssl_text_fn, or neither")
        df = read_pairs(csv_path, image_key, caption_key)
        self.csv_path = Path(csv_path)
        self.image_paths = resolve_image_paths(csv_path, df[image_key])
        self.captions: list[str] = df[caption_key].tolist()
        self.transform = transform
        self.tokenize = tokenize
        self.on_bad_image = on_bad_image
        self.ssl_image_transform = ssl_image_transform
        self.ssl_text_fn = ssl_text_fn
        self.seed = seed
        self.epoch = 0

    @property
    def has_ssl_views(self) -> bool:
        return self.ssl_image_transform is not None

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call before each epoch; DataLoader workers see it when they start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        path = self.image_paths[index]
        try:
            image = open_rgb(path)
        except BadImage as e:
            if self.on_bad_image == "skip":
                return None
            raise UserError(f"{self.csv_path}: row {index} (0-based): cannot read image {path} ({e}); fix or remove "
                            f"the row, or use on_bad_image 'skip'") from None
        return training_item(image, self.captions[index], index, seed=item_seed(self.seed, self.epoch, index),
                             transform=self.transform, tokenize=self.tokenize,
                             ssl_image_transform=self.ssl_image_transform, ssl_text_fn=self.ssl_text_fn)


def training_item(image: Any, caption: str, index: int, *, seed: int, transform: Callable[[Any], torch.Tensor],
                  tokenize: Callable[[list[str]], torch.Tensor],
                  ssl_image_transform: Callable[[Any], torch.Tensor] | None = None,
                  ssl_text_fn: Callable[[str, random.Random], str] | None = None) -> dict[str, torch.Tensor]:
    """One training dict (`image`, `text`, `index`, and the SSL views when given) of a pair, every random draw a
    function of `seed` alone: the same on a CSV and on shards, with any number of workers."""
    # torchvision's random transforms draw from the global torch RNG: fork it so the draw is a function of the seed
    # alone and the caller's RNG stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        item = {"image": transform(image)}
        texts = [caption]
        if ssl_image_transform is not None:
            item["image_aug"] = ssl_image_transform(image)
            texts.append(ssl_text_fn(caption, random.Random(seed)))
    tokens = tokenize(texts)
    item["text"] = tokens[0]
    if ssl_image_transform is not None:
        item["text_aug"] = tokens[1]
    item["index"] = torch.tensor(index, dtype=torch.long)
    return item


def collate_skip(batch: list[dict[str, torch.Tensor] | None]) -> dict[str, Any]:
    """Collate training dicts, dropping skipped (None) items; `skipped` (int) says how many were dropped.

    A batch whose items were all skipped holds only `skipped`; the training loop should count it and move on.
    """
    kept = [b for b in batch if b is not None]
    out: dict[str, Any] = default_collate(kept) if kept else {}
    out["skipped"] = len(batch) - len(kept)
    return out


def _header_count(path: Path, key: str) -> int:
    """How often `key` names a column in the CSV's header line."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), []).count(key)
