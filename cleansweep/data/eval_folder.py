"""Zero-shot evaluation sets: an ImageNet-style folder (one subfolder per class) as raw model-size tensors.

Items are raw [0, 1] images (no normalisation) because triggers for the attack-success rate are applied to raw
pixels, before the model's normalisation. Class names and prompt templates come from files next to the images,
or from open_clip's ImageNet metadata when the folders are ImageNet wnids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset

from cleansweep.data.images import IMAGE_EXTENSIONS, BadImage, open_rgb, raw_transform
from cleansweep.errors import UserError

WNID = re.compile(r"n\d{8}")


def openai_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompt templates as format strings ('a photo of a {}.')."""
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def imagenet_classnames(wnids: list[str]) -> list[str]:
    """open_clip's readable ImageNet-1k class names for the given wnid folders (timm ships the wnid order)."""
    from timm.data import ImageNetInfo  # open_clip depends on timm; imported only for wnid folders

    index = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise UserError(f"folder(s) {', '.join(unknown[:3])} look like wnids but are not ImageNet-1k classes; "
                        f"add a classnames.json mapping folder -> class name")
    return [IMAGENET_CLASSNAMES[index[w]] for w in wnids]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix the file or remove it") from None


def load_classnames(root: Path, folders: list[str]) -> list[str]:
    """Class names in folder order: root/classnames.json, else ImageNet names for wnids, else the folder names."""
    path = root / "classnames.json"
    if path.is_file():
        mapping = _read_json(path)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise UserError(f"{path}: expected a JSON object mapping folder name -> class name; fix the file")
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise UserError(f"{path}: no name for folder(s) {', '.join(missing[:5])}; add them to the mapping")
        return [mapping[f] for f in folders]
    if all(WNID.fullmatch(f) for f in folders):
        return imagenet_classnames(folders)
    return [f.replace("_", " ") for f in folders]


def load_templates(root: Path) -> list[str]:
    """Prompt templates: root/templates.json (a list of strings with one '{}'), else open_clip's 80 OpenAI ones."""
    path = root / "templates.json"
    if not path.is_file():
        return openai_templates()
    templates = _read_json(path)
    if not isinstance(templates, list) or not templates:
        raise UserError(f"{path}: expected a non-empty JSON list of templates; write e.g. [\"a photo of a {{}}.\"]")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise UserError(f"{path}: template {bad[0]!r} needs exactly one '{{}}' for the class name; fix it")
    return templates


def class_folders(root: Path) -> list[str]:
    """Sorted class subfolders of `root`; hidden ones (`.ipynb_checkpoints`, `.git`) are not classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _visible_image(path: str, root: str) -> bool:
    """An image file below `root` with no hidden part (`._x.jpg`, `cls/.ipynb_checkpoints/x.png`)."""
    hidden = any(part.startswith(".") for part in Path(os.path.relpath(path, root)).parts)
    return path.lower().endswith(IMAGE_EXTENSIONS) and not hidden


class EvalFolder(Dataset):
    """ImageNet-style evaluation folder; items are `(raw image (3, S, S) in [0, 1], label)`.

    Args:
        root: folder with one subfolder per class (sorted folder names define the label order).
        image_size: model resolution S (shorter side resized bicubic, then center crop).
        subset: evaluate a fixed random subset of this many images (seeded; all images when >= the total).
        seed: seed of the subset draw.

    Attributes:
        classnames: readable class names, one per label.
        templates: prompt format strings for the zero-shot classifier.
        samples: (path, label) pairs in evaluation order.
    """

    def __init__(self, root: str | Path, image_size: int, *, subset: int | None = None, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"evaluation folder not found: {self.root}; pass a folder with one subfolder per class")
        folders = class_folders(self.root)
        if len(folders) < 2:
            have = f"only the class {folders[0]!r}" if folders else "no class subfolders"
            raise UserError(f"{self.root} has {have}; zero-shot accuracy and the attack success rate need at least two "
                            "classes (one subfolder per class)")
        class_to_idx = {name: i for i, name in enumerate(folders)}
        samples = make_dataset(str(self.root), class_to_idx, allow_empty=True,
                               is_valid_file=lambda path: _visible_image(path, str(self.root)))
        if not samples:
            raise UserError(f"{self.root}: no images in its class subfolders (extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add images or pass another folder")
        counts = torch.bincount(torch.tensor([label for _, label in samples]), minlength=len(folders))
        empty = [folders[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise UserError(f"{self.root}: class folder(s) {', '.join(empty[:5])} hold no images; add images or remove "
                            f"the folder(s)")
        if subset is not None:
            if subset < 1:
                raise UserError(f"evaluation subset must be >= 1 image, got {subset}; pass a positive number")
            if subset < len(samples):
                pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:subset]
                samples = [samples[i] for i in sorted(pick.tolist())]
        self.folders = folders
        self.classnames = load_classnames(self.root, folders)
        self.templates = load_templates(self.root)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.image_size = image_size
        self.transform = raw_transform(image_size)

    def class_index(self, name: str) -> int:
        """Label of a class given its readable name or folder name (e.g. the attack target 'banana')."""
        for names in (self.classnames, self.folders):
            if name in names:
                return names.index(name)
        raise UserError(f"class {name!r} is not in {self.root}; choose a target from: {', '.join(self.classnames[:20])}"
                        f"{' ...' if len(self.classnames) > 20 else ''}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except BadImage as e:
            raise UserError(f"evaluation image {path} cannot be read ({e}); replace or remove it") from None
        return self.transform(image), label
