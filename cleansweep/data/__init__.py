"""Datasets: image-caption CSVs, zero-shot evaluation folders and the built-in synthetic world."""

from cleansweep.data.eval_folder import EvalFolder, imagenet_classnames, openai_templates
from cleansweep.data.images import BadImage, open_rgb, raw_transform
from cleansweep.data.pairs import ImageCaptionDataset, collate_skip, read_pairs
from cleansweep.data.synthetic import DEFAULT_KNOBS, make_demo_world

__all__ = [
    "DEFAULT_KNOBS",
    "BadImage",
    "EvalFolder",
    "ImageCaptionDataset",
    "collate_skip",
    "imagenet_classnames",
    "make_demo_world",
    "open_rgb",
    "openai_templates",
    "raw_transform",
    "read_pairs",
]
