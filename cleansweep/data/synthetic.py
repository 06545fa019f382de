"""The built-in synthetic world: procedurally drawn images of named classes with captions, written as real data.

Each class is a noun ("banana") drawn as a combination of shape, colour and pattern ("a yellow crescent, solid").
The 30 classes come in 10 groups of 3 near classes; the `shared_attributes` knob sets how many attributes the
members of a group share (0: none, 1: shape, 2: shape and colour, so they differ only by pattern). Other knobs
set clutter (distractor shapes behind the object), pixel noise, caption noise (a caption names a related wrong
class, or no class), and scale/position/rotation jitter. Everything is a function of the knobs and the seed.

The cleaning set can be drawn with a shift from the evaluation distribution, as in the paper (CleanCLIP's 100K
clean pairs are a CC3M subset, not ImageNet): the `clean_classes` knob draws clean.csv from a seeded subset of
that many classes (0: all), listed in world.json as `clean_class_names`. Training and evaluation always cover
every class.

Output (the same formats as real data, so every code path is exercised): `train.csv` + `train/*.png`, `clean.csv` +
`clean/*.png` (disjoint draws, for cleaning), `eval/<class>/*.png` with `classnames.json` and `templates.json`, and
`world.json` (every knob, the seed and the class table). Written into a temporary folder and renamed at the end.

Zero-shot templates: 8 CLIP-style templates, most of them from OpenAI's 80 ImageNet templates. The world's
captions are short and simple, so a handful of prompts that look like them makes zero-shot accuracy meaningful,
while the 80 ImageNet templates (many about sculptures, tattoos, origami...) would only add noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cleansweep.errors import UserError
from cleansweep.limits import MAX_COUNT, MAX_IMAGE_SIDE, SEED_MAX

WORLD_VERSION = 1

SHAPES = ("crescent", "circle", "ring", "square", "triangle", "star", "ellipse", "heart", "diamond", "hexagon")
PALETTE = {
    "red": (0.85, 0.12, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (0.96, 0.86, 0.10),
    "green": (0.15, 0.62, 0.20), "blue": (0.15, 0.30, 0.90), "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.52, 0.72), "brown": (0.50, 0.30, 0.12), "white": (0.96, 0.96, 0.96),
    "black": (0.08, 0.08, 0.08), "cyan": (0.10, 0.80, 0.85),
}
PATTERNS = ("solid", "stripes", "dots", "checker", "rim")

# Ten groups of three near classes; group g is drawn with SHAPES[g]. Within a group colours and patterns differ,
# so each knob setting below keeps every class a distinct (shape, colour, pattern) combination.
CLASS_GROUPS = (
    (("banana", "yellow", "solid"), ("moon", "white", "dots"), ("croissant", "brown", "stripes")),
    (("tomato", "red", "solid"), ("orange", "orange", "dots"), ("watermelon", "green", "stripes")),
    (("donut", "pink", "dots"), ("tire", "black", "solid"), ("lifebuoy", "red", "stripes")),
    (("window", "cyan", "solid"), ("chessboard", "black", "checker"), ("cracker", "brown", "dots")),
    (("pizza", "red", "dots"), ("tent", "green", "stripes"), ("cheese", "yellow", "solid")),
    (("starfish", "orange", "dots"), ("snowflake", "white", "solid"), ("badge", "yellow", "stripes")),
    (("egg", "white", "solid"), ("lemon", "yellow", "dots"), ("eggplant", "purple", "stripes")),
    (("strawberry", "red", "dots"), ("balloon", "pink", "solid"), ("leaf", "green", "stripes")),
    (("kite", "blue", "stripes"), ("diamond", "cyan", "solid"), ("sign", "yellow", "checker")),
    (("honeycomb", "orange", "checker"), ("turtle", "green", "dots"), ("nut", "brown", "rim")),
)
MAX_CLASSES = sum(len(g) for g in CLASS_GROUPS)

CAPTION_TEMPLATES = (
    "a photo of {a} {c}.", "{a} {c} on a plain background", "there is {a} {c} in this picture",
    "my favourite {c}, {f}", "{f}: {a} {c}", "look at this {c}", "{a} small {c} near the middle",
    "an image showing {a} {c}", "{c} {f}", "just {a} {c} and some shapes", "a drawing of {a} {c}.",
    "{a} {colour} {c}", "the {c} i saw {f}", "close-up of {a} {c}",
)
FILLERS = ("today", "taken yesterday", "at home", "so nice", "from my collection", "photo by me", "cool",
           "in good light", "on the table", "with friends", "new upload", "lol", "again", "for the record")
GENERIC_WORDS = ("thing", "object", "shape", "item")
EVAL_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.",
                  "a photo of the {}.", "a close-up photo of a {}.", "a blurry photo of a {}.",
                  "a low resolution photo of a {}.")

# Defaults from a supervised probe (small CNN, 8,000 images, clean labels): with clutter 3, noise 0.15, contrast
# 0.55 it reached only 0.40 top-1 in 7 epochs (0.77 on the shape group); these settings gave 0.58 after 3 epochs
# and still rising, leaving a contrastive model with caption noise room between chance and saturation.
DEFAULT_KNOBS: dict[str, Any] = {
    "num_classes": MAX_CLASSES,  # first N classes of CLASS_GROUPS (banana is always class 0)
    "shared_attributes": 2,  # attributes near classes share: 0 none, 1 shape, 2 shape + colour
    "clutter": 2,  # distractor shapes (random shape and colour) drawn behind the object
    "noise": 0.1,  # sd of Gaussian pixel noise on [0, 1] images
    "caption_noise": 0.1,  # probability a caption names a related wrong class (half) or no class (half)
    "jitter": 0.5,  # 0..1 scale of object size / position / rotation variation
    "colour_jitter": 0.06,  # sd of the per-image colour shift of the object
    "pattern_contrast": 0.8,  # 0..1 how far pattern marks move toward black/white
    "clean_classes": 0,  # clean.csv draws only this many classes (a seeded subset; 0: all of them)
}
SPLIT_IDS = {"train": 1, "clean": 2, "eval": 3}


# ------------------------------------------------------------------------------------------------- classes
def class_table(num_classes: int, shared_attributes: int) -> list[dict[str, str]]:
    """The class list for a knob setting: name, shape, colour, pattern and group of each class."""
    groups = len(CLASS_GROUPS)
    table = []
    for g, members in enumerate(CLASS_GROUPS):
        for j, (name, colour, pattern) in enumerate(members):
            # Without shared shapes, member j borrows group g + 2j's shape (the step that keeps all 30 distinct).
            shape = SHAPES[g] if shared_attributes >= 1 else SHAPES[(g + 2 * j) % groups]
            colour = members[0][1] if shared_attributes >= 2 else colour
            table.append({"name": name, "shape": shape, "colour": colour, "pattern": pattern, "group": g})
    return table[:num_classes]


# ------------------------------------------------------------------------------------------------- drawing
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of points inside a unit-size shape in object coordinates (u right, v down)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.7) & (v >= -0.95 + 1.74 * np.abs(u))
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.85**2)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if shape == "hexagon":
        return np.max([np.abs(u * np.cos(a) + v * np.sin(a)) for a in (0.0, np.pi / 3, 2 * np.pi / 3)], 0) <= 0.87
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.12
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "star":
        m, a = 5, 0.45
        beta = np.abs(np.mod(np.arctan2(u, -v), 2 * np.pi / m) - np.pi / m)
        edge = a * np.sin(np.pi / m) / (np.sin(np.pi / m) * np.cos(beta) - (np.cos(np.pi / m) - a) * np.sin(beta))
        return np.sqrt(r2) <= edge
    raise ValueError(f"unknown shape {shape!r}")


def _marks(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of the pattern's marks in object coordinates (they move and rotate with the object)."""
    if pattern == "solid":
        return np.zeros_like(u, dtype=bool)
    if pattern == "stripes":
        return np.sin(u * np.pi * 2.5) > 0
    if pattern == "dots":
        return (np.mod(u * 2.2, 1) - 0.5) ** 2 + (np.mod(v * 2.2, 1) - 0.5) ** 2 < 0.3**2
    if pattern == "checker":
        return (np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 0
    if pattern == "rim":
        return _inside(shape, u / 0.6, v / 0.6)
    raise ValueError(f"unknown pattern {pattern!r}")


def _placement(rng: np.random.Generator, size: float, jitter: float) -> tuple[float, float, float, float]:
    """Half-size, centre (x, y) and rotation of one object; `jitter` scales the spread of all four."""
    half = size * (1 + jitter * rng.uniform(-0.35, 0.35))
    cx, cy = rng.uniform(-1, 1, 2) * max(0.0, 0.95 - half) * max(jitter, 0.15)
    theta = np.deg2rad(35.0) * jitter * rng.uniform(-1, 1)
    return half, cx, cy, theta


def _shade(colour: np.ndarray, contrast: float) -> np.ndarray:
    # Marks move toward black on light colours and toward white on dark ones, so every pattern stays visible.
    toward = 0.0 if colour @ np.array([0.299, 0.587, 0.114]) > 0.35 else 1.0
    return colour + contrast * (toward - colour)


def sample_scene(cls: dict[str, str], rng: np.random.Generator, image_size: int, knobs: dict[str, Any]) -> dict:
    """All random choices for one image of `cls` (drawn in a fixed order from `rng`): background, layers, noise.

    Layers are drawn back to front: `clutter` distractors (random shape and palette colour, solid, smaller), then
    the object itself with a jittered colour.
    """
    background = rng.uniform(0.3, 0.6) + rng.normal(0, 0.04, 3)
    names = list(PALETTE)
    layers = []
    for _ in range(knobs["clutter"]):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], np.array(PALETTE[names[rng.integers(len(names))]])
        layers.append((shape, colour, "solid", colour, _placement(rng, rng.uniform(0.18, 0.32), 1.0)))
    colour = np.clip(np.array(PALETTE[cls["colour"]]) + rng.normal(0, knobs["colour_jitter"], 3), 0, 1)
    layers.append((cls["shape"], colour, cls["pattern"], _shade(colour, knobs["pattern_contrast"]),
                   _placement(rng, 0.55, knobs["jitter"])))
    noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * np.float32(knobs["noise"])
    return {"background": background, "layers": layers, "noise": noise}


def render(scene: dict, image_size: int) -> np.ndarray:
    """Draw one scene -> uint8 (S, S, 3). Each layer is evaluated only inside its bounding box."""
    ss = 2 if image_size <= 64 else 1  # 2x supersampling anti-aliases the small shapes
    n = image_size * ss
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    canvas = np.empty((n, n, 3))
    canvas[:] = scene["background"]
    for shape, colour, pattern, marked, (half, cx, cy, theta) in scene["layers"]:
        # A radius of sqrt(2) * half covers the unit-size shape under any rotation.
        c0, c1 = np.searchsorted(coords, (cx - 1.42 * half, cx + 1.42 * half))
        r0, r1 = np.searchsorted(coords, (cy - 1.42 * half, cy + 1.42 * half))
        if c1 <= c0 or r1 <= r0:
            continue
        xs, ys = (coords[c0:c1] - cx)[None, :], (coords[r0:r1] - cy)[:, None]
        cos, sin = np.cos(theta) / half, np.sin(theta) / half
        u, v = xs * cos + ys * sin, ys * cos - xs * sin
        inside = _inside(shape, u, v)
        box = canvas[r0:r1, c0:c1]
        box[inside] = colour
        if pattern != "solid":
            box[inside & _marks(pattern, shape, u, v)] = marked
    if ss == 2:
        canvas = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) * 0.25
    return (np.clip(canvas + scene["noise"], 0, 1) * 255).round().astype(np.uint8)


def draw_image(cls: dict[str, str], rng: np.random.Generator, image_size: int, knobs: dict[str, Any]) -> np.ndarray:
    """One uint8 (S, S, 3) image of class `cls`."""
    return render(sample_scene(cls, rng, image_size, knobs), image_size)


# ------------------------------------------------------------------------------------------------ captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(cls: dict[str, str], table: list[dict[str, str]], rng: np.random.Generator,
                 caption_noise: float) -> str:
    """A varied caption for an image of `cls`; with probability `caption_noise` it names a related wrong class
    (a member of the same group when there is one) or only a generic word."""
    name, colour = cls["name"], cls["colour"]
    if rng.random() < caption_noise:
        if rng.random() < 0.5:
            related = [c for c in table if c["group"] == cls["group"] and c["name"] != cls["name"]]
            others = related or [c for c in table if c["name"] != cls["name"]]
            name = others[rng.integers(len(others))]["name"]
        else:
            name = GENERIC_WORDS[rng.integers(len(GENERIC_WORDS))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    filler = FILLERS[rng.integers(len(FILLERS))]
    article = _article(colour if "{a} {colour}" in template else name)
    return template.format(a=article, c=name, f=filler, colour=colour)


# ------------------------------------------------------------------------------------------------- writing
def _check_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise UserError(f"unknown demo-world knob(s) {', '.join(unknown)}; choose from: {', '.join(DEFAULT_KNOBS)}")
    k = {**DEFAULT_KNOBS, **knobs}
    for name, value in k.items():  # JSON from --knob can be any type: compare numbers only
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"demo-world knob {name}={value!r} must be a number, e.g. {DEFAULT_KNOBS[name]}")
    checks = [
        ("num_classes", isinstance(k["num_classes"], int) and 2 <= k["num_classes"] <= MAX_CLASSES,
         f"an integer in 2..{MAX_CLASSES}"),
        ("shared_attributes", isinstance(k["shared_attributes"], int) and k["shared_attributes"] in (0, 1, 2),
         "0, 1 or 2"),
        ("clutter", isinstance(k["clutter"], int) and 0 <= k["clutter"] <= 20, "an integer in 0..20"),
        ("noise", 0 <= k["noise"] <= 1, "in [0, 1]"),
        ("caption_noise", 0 <= k["caption_noise"] <= 1, "in [0, 1]"),
        ("jitter", 0 <= k["jitter"] <= 1, "in [0, 1]"),
        ("colour_jitter", 0 <= k["colour_jitter"] <= 1, "in [0, 1]"),
        ("pattern_contrast", 0 <= k["pattern_contrast"] <= 1, "in [0, 1]"),
        ("clean_classes", isinstance(k["clean_classes"], int) and 0 <= k["clean_classes"] <= k["num_classes"],
         f"an integer in 0..num_classes ({k['num_classes']}); 0 draws the clean set from every class"),
    ]
    for name, ok, want in checks:
        if not ok:
            raise UserError(f"demo-world knob {name}={k[name]!r} is out of range; use {want}")
    return k


def _write_images(folder: Path, jobs: list[tuple[str, dict[str, str], np.random.Generator]], image_size: int,
                  knobs: dict[str, Any]) -> None:
    """Draw and save (relative path, class, rng) jobs as PNG."""
    for rel, cls, rng in jobs:
        Image.fromarray(draw_image(cls, rng, image_size, knobs)).save(folder / rel, compress_level=1)


def clean_class_indices(num_classes: int, clean_classes: int, seed: int) -> list[int]:
    """Indices (into the class table) of the classes clean.csv draws from: all, or a seeded subset of that size."""
    if clean_classes in (0, num_classes):
        return list(range(num_classes))
    rng = np.random.default_rng([seed, SPLIT_IDS["clean"], 2])
    return sorted(int(i) for i in rng.choice(num_classes, size=clean_classes, replace=False))


def _write_pairs(folder: Path, split: str, n: int, seed: int, table: list[dict[str, str]], image_size: int,
                 knobs: dict[str, Any], classes: list[int] | None = None) -> None:
    """Write `split/*.png` and `split.csv` (image, caption, label): balanced over `classes` (default: every class
    of `table`) in a seeded random order. Captions may still name any class of `table` (caption noise)."""
    classes = list(range(len(table))) if classes is None else classes
    order = np.random.default_rng([seed, SPLIT_IDS[split], 0]).permutation(np.arange(n) % len(classes))
    (folder / split).mkdir()
    jobs, rows = [], []
    for i, slot in enumerate(order):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], 1, i])
        cls = table[classes[slot]]
        rel = f"{split}/{i:06d}.png"
        caption = make_caption(cls, table, rng, knobs["caption_noise"])
        rows.append(f"{rel},{_csv_field(caption)},{cls['name']}")
        jobs.append((rel, cls, rng))
    _write_images(folder, jobs, image_size, knobs)
    (folder / f"{split}.csv").write_text("image,caption,label\n" + "\n".join(rows) + "\n")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def _write_eval(folder: Path, n: int, seed: int, table: list[dict[str, str]], image_size: int,
                knobs: dict[str, Any]) -> None:
    """Write `eval/<class>/*.png` (balanced: image i shows class i mod C), `classnames.json`, `templates.json`."""
    root = folder / "eval"
    for cls in table:
        (root / cls["name"]).mkdir(parents=True)
    jobs = [(f"eval/{table[i % len(table)]['name']}/{i:06d}.png", table[i % len(table)],
             np.random.default_rng([seed, SPLIT_IDS["eval"], 1, i])) for i in range(n)]
    _write_images(folder, jobs, image_size, knobs)
    (root / "classnames.json").write_text(json.dumps({c["name"]: c["name"] for c in table}, indent=2) + "\n")
    (root / "templates.json").write_text(json.dumps(list(EVAL_TEMPLATES), indent=2) + "\n")


def _existing_world(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _info(out_dir: Path, world: dict[str, Any], reused: bool, seconds: float) -> dict[str, Any]:
    return {**world, "out_dir": str(out_dir), "train_csv": str(out_dir / "train.csv"),
            "clean_csv": str(out_dir / "clean.csv"), "eval_dir": str(out_dir / "eval"), "reused": reused,
            "seconds": round(seconds, 3)}


def make_demo_world(out_dir: str | Path, *, seed: int = 0, n_train: int = 8000, n_clean: int = 2000,
                    n_eval: int = 1500, image_size: int = 32, **knobs: Any) -> dict[str, Any]:
    """Write the synthetic demo world to `out_dir` (or reuse an identical one already there).

    Args:
        out_dir: destination folder; must not exist, be empty, or hold a world made with the same knobs.
        seed: seed of every draw (images, captions, order); the class table depends only on the knobs.
        n_train: training pairs (train.csv).
        n_clean: clean pairs for cleaning (clean.csv), drawn independently of the training pairs.
        n_eval: evaluation images, balanced over classes.
        image_size: image side in pixels.
        **knobs: difficulty knobs, see DEFAULT_KNOBS (num_classes, shared_attributes, clutter, noise,
            caption_noise, jitter, colour_jitter, pattern_contrast, clean_classes).

    Returns:
        world.json's content plus `out_dir`, `train_csv`, `clean_csv`, `eval_dir`, `reused`, `seconds`.

    Raises:
        UserError: bad knob values, or `out_dir` holds something else.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    sizes = {"n_train": n_train, "n_clean": n_clean, "n_eval": n_eval, "image_size": image_size}
    for name, value in {**sizes, "seed": seed}.items():
        low, high = {"image_size": (8, MAX_IMAGE_SIDE), "seed": (0, SEED_MAX)}.get(name, (1, MAX_COUNT))
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UserError(f"demo world {name}={value!r} is invalid; use an integer in {low}..{high}")
    knobs = _check_knobs(knobs)
    table = class_table(knobs["num_classes"], knobs["shared_attributes"])
    if n_eval < len(table):
        raise UserError(f"demo world n_eval={n_eval} is fewer than its {len(table)} classes; use n_eval >= "
                        f"{len(table)}")
    clean_classes = clean_class_indices(len(table), knobs["clean_classes"], seed)
    world = {"version": WORLD_VERSION, "seed": seed, **sizes, "knobs": knobs, "classes": table,
             "clean_class_names": [table[i]["name"] for i in clean_classes], "eval_templates": list(EVAL_TEMPLATES)}
    if out_dir.exists():
        existing = _existing_world(out_dir)
        if existing == world:
            return _info(out_dir, world, True, time.perf_counter() - start)
        if existing is not None or any(out_dir.iterdir()):
            raise UserError(f"{out_dir} already holds other files or a different world; pass a new --out folder "
                            f"or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_pairs(tmp, "train", n_train, seed, table, image_size, knobs)
        _write_pairs(tmp, "clean", n_clean, seed, table, image_size, knobs, clean_classes)
        _write_eval(tmp, n_eval, seed, table, image_size, knobs)
        (tmp / "world.json").write_text(json.dumps(world, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out_dir)
    except OSError:
        # Another process may have finished the same world first: use it if identical.
        if _existing_world(out_dir) == world:
            return _info(out_dir, world, True, time.perf_counter() - start)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _info(out_dir, world, False, time.perf_counter() - start)
