"""The bad-input table's inputs (reliability part `inputs`): a tiny world, a random tiny-rn checkpoint, broken and
hostile checkpoints, CSVs, images and evaluation folders, a poisoned output folder, and a finished sweep whose
folder and MLflow database must not change. Files that carry SECRET check that errors never echo contents."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reliability_common import PATCH, run_cli, write_space

SECRET = "CSW-SECRET-5f1e9b"  # written into input files; must never appear in what the CLI prints


@dataclass
class Case:
    """One bad input: the command and the words its message must contain (each word may be `a|b`, either one).
    `accepted`, when set, makes exit 0 right too if it returns None for the command's stdout (inputs that may be
    handled correctly instead of refused); `max_seconds` bounds the wall time (an unreachable server)."""

    area: str
    what: str
    args: list[str]
    expect: tuple[str, ...]
    check: Callable[[], str | None] | None = None
    accepted: Callable[[str], str | None] | None = None
    max_seconds: float | None = None


class _CodeInPickle:
    """Unpickling this runs a shell command (it creates a marker file): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but holds one row of data (a decompression bomb's
    header: Pillow reads the size before any pixel)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def sixteen_bit_png(path: Path, size: int = 32) -> None:
    """A 16-bit greyscale gradient (0..65535): read as 8-bit without scaling it turns almost white."""
    import numpy as np
    from PIL import Image

    ramp = (np.arange(size * size, dtype=np.uint32).reshape(size, size) * 65535 // (size * size - 1))
    Image.fromarray(ramp.astype(np.uint16)).save(path)


def _bad_checkpoints(fx: Path, good: Path) -> dict[str, Path]:
    """Broken and hostile checkpoint files next to a good tiny-rn one."""
    import safetensors.torch
    import torch

    from cleansweep.models import create_model, save_checkpoint

    d = fx / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _CodeInPickle(d / "PWNED")}, d / "evil.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(d / "script.pt"))
    (d / "junk.safetensors").write_bytes(os.urandom(4096))
    (d / "junk.pt").write_bytes(b"PK\x03\x04" + os.urandom(4096))
    (d / "empty.safetensors").write_bytes(b"")
    torch.save([torch.zeros(2)], d / "list.pt")
    save_checkpoint(d / "vit.safetensors", create_model("tiny-vit", seed=0).model, {"model": "tiny-vit"})
    state = safetensors.torch.load_file(str(good))
    first = next(k for k, v in state.items() if v.ndim >= 1 and v.shape[0] > 1)
    state[first] = state[first][:1].contiguous()  # one tensor of the wrong shape, no card
    safetensors.torch.save_file(state, str(d / "resized.safetensors"))
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(d / "foreign.safetensors"))
    shutil.copyfile(good, d / "badcard.safetensors")
    (d / "badcard.json").write_text("{not json " + SECRET)
    data = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    for label, value in (("nan", float("nan")), ("inf", float("inf"))):
        model = create_model("tiny-rn", seed=0).model
        with torch.no_grad():
            next(p for p in model.parameters() if p.numel() > 1).view(-1)[0] = value
        save_checkpoint(d / f"{label}.safetensors", model, {"model": "tiny-rn"})
    save_checkpoint(d / "cardlies.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-vit"})
    save_checkpoint(d / "notrigger.safetensors", create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    return {p.name: p for p in d.iterdir()}


def _image_files(d: Path, png: bytes) -> None:
    (d / "junk.png").write_bytes(os.urandom(512))
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "bomb.png").write_bytes(declared_png(40_000, 40_000))  # 1.6 G pixels: Pillow's error zone (> 179 M)
    (d / "warnbomb.png").write_bytes(declared_png(10_000, 10_000))  # 100 M pixels: Pillow only warns
    sixteen_bit_png(d / "sixteen.png")


def _bad_csvs(fx: Path, world: dict) -> dict[str, Path]:
    """Image-caption CSVs with one thing wrong each (image paths absolute, into the tiny world)."""
    import pandas as pd

    d = fx / "csv"
    img = d / "img"
    img.mkdir(parents=True, exist_ok=True)
    rows = pd.read_csv(world["clean_csv"], dtype=str)
    base = Path(world["clean_csv"]).parent
    good = [(str(base / im), cap) for im, cap in zip(rows["image"], rows["caption"], strict=True)][:8]
    _image_files(img, Path(good[0][0]).read_bytes())

    def write(name: str, pairs: list[tuple[str, ...]], header: tuple[str, ...] = ("image", "caption")) -> None:
        with open(d / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *pairs])

    def row3(image: Path | str, caption: str = "a photo of a banana") -> list[tuple[str, str]]:
        return [*good[:3], (str(image), caption), *good[4:]]

    write("nocaption", good, header=("image", "text"))
    write("noimage", good, header=("picture", "caption"))
    write("dupcolumns", [(*g, g[1]) for g in good], header=("image", "caption", "caption"))
    write("blankcaption", [*good[:3], (good[3][0], " "), *good[4:]])
    for name in ("missingimage", "corruptimage", "truncatedimage", "emptyimage", "dirimage", "bomb", "warnbomb"):
        target = {"missingimage": img / "gone.png", "corruptimage": img / "junk.png", "dirimage": img,
                  "truncatedimage": img / "truncated.png", "emptyimage": img / "empty.png"}.get(name)
        write(name, row3(target or img / f"{name}.png"))
    write("secretcaption", row3(img / "gone.png", f"a photo of {SECRET}"))
    write("sixteenbit", [(str(img / "sixteen.png"), "a photo of a banana")])
    (d / "empty.csv").write_bytes(b"")
    (d / "header.csv").write_text("image,caption\n")
    (d / "secretline.csv").write_text(SECRET)
    (d / "garbage.csv").write_bytes(os.urandom(2048))
    (d / "binary.csv").write_bytes(b"image,caption\n\xff\xfe\x00\x81" + os.urandom(64))
    (d / "utf16.csv").write_bytes("image,caption\n".encode("utf-16") + f"{good[0][0]},x\n".encode("utf-16-le"))
    (d / "ragged.csv").write_text(f"image,caption\n{good[0][0]},a,b,c\n{good[1][0]},d\n\"unclosed,e\n")
    return {p.stem: p for p in d.glob("*.csv")}


def _copy_eval(src: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    return dest


def _bad_eval_folders(fx: Path, world: dict) -> dict[str, Path]:
    """Evaluation folders with one thing wrong each (copies of the tiny world's)."""
    d = fx / "eval"
    src = Path(world["eval_dir"])
    out = {name: _copy_eval(src, d / name) for name in ("oneempty", "corrupt", "badnames", "badtemplates", "hidden",
                                                         "bomb", "oneclass")}
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    for image in (out["oneempty"] / classes[0].name).iterdir():
        image.unlink()
    (out["corrupt"] / classes[0].name / "zz-junk.png").write_bytes(os.urandom(512))
    (out["bomb"] / classes[0].name / "zz-bomb.png").write_bytes(declared_png(40_000, 40_000))
    (out["badnames"] / "classnames.json").write_text("[1, 2, " + f'"{SECRET}"]')
    (out["badtemplates"] / "templates.json").write_text('["a photo without a slot"]')
    shutil.copytree(classes[0], out["hidden"] / ".ipynb_checkpoints")  # a notebook's folder is not a class
    for extra in classes[1:]:
        shutil.rmtree(out["oneclass"] / extra.name)
    (d / "flat").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next(src.rglob("*.png")), d / "flat" / "one.png")
    (d / "noimages" / "banana").mkdir(parents=True, exist_ok=True)
    (d / "noimages" / "banana" / "readme.txt").write_text("not an image")
    (d / "empty").mkdir(parents=True, exist_ok=True)
    return {**out, "flat": d / "flat", "noimages": d / "noimages", "empty": d / "empty",
            "images": sum(1 for p in src.rglob("*.png"))}


def input_fixtures(root: Path) -> dict[str, Any]:
    """Inputs of the bad-input cases under root/fx: a tiny world, a random tiny-rn checkpoint, broken CSVs,
    checkpoints and evaluation folders, a poisoned output folder and a tampered copy of it."""
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world
    from cleansweep.models import create_model, save_checkpoint

    fx = root / "fx"
    for left in [*fx.glob("no-such-folder*"), *fx.glob("gone*"), fx / "ckpt" / "PWNED"]:
        shutil.rmtree(left) if left.is_dir() else left.unlink(missing_ok=True)  # an earlier run's wrong writes
    world = make_demo_world(fx / "world", seed=0, n_train=32, n_clean=32, n_eval=12, image_size=32, num_classes=6)
    model = fx / "model.safetensors"
    # Its card records the trigger, as a poisoned model's card does: the cases then test what they name, not the
    # refusal of a model whose trigger is unknown.
    attack = {"name": "badnet", "patch_size": PATCH, "location": "fixed", "patch": "fixed"}
    if not model.is_file() or json.loads(model.with_suffix(".json").read_text()).get("attack") != attack:
        save_checkpoint(model, create_model("tiny-rn", seed=0).model, {"model": "tiny-rn", "attack": attack})
    poison_csv(world["train_csv"], fx / "poisoned", attack="badnet", target="banana", fraction=0.25, seed=0,
               image_size=32)
    tampered = fx / "poisoned-tampered"
    if not tampered.exists():
        shutil.copytree(fx / "poisoned", tampered)
        table = next(tampered.glob("*.csv"))
        table.write_text(table.read_text() + table.read_text().splitlines()[1] + "\n")
    listed = fx / "manifest-list"
    listed.mkdir(exist_ok=True)
    (listed / "manifest.json").write_text("[1, 2]")
    return {"fx": fx, "world": world, "model": model, "ckpt": _bad_checkpoints(fx, model),
            "csv": _bad_csvs(fx, world), "eval": _bad_eval_folders(fx, world), "tampered": tampered,
            "manifest_list": listed}


KEPT_EXTRA = """
epochs: 1
base: {optim.warmup_steps: 2, device: cpu}
space:
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
search: {num_samples: 1, max_concurrent: 1}
scheduler: {name: none}
resources: {cpu: 1}
"""


def finished_sweep(root: Path, fixtures: dict[str, Any], env: dict[str, str]) -> Path:
    """A finished one-trial sweep `kept` in root/work0 (its folder and MLflow database are what must not change)."""
    work = root / "work0"
    sweeps = sorted(p.name for p in (work / "sweeps").iterdir()) if (work / "sweeps").is_dir() else []
    if sweeps == ["kept"] and (work / "sweeps" / "kept" / "leaderboard.csv").is_file():
        return work
    # An earlier run's accepted bad input left another sweep here: its name would now be refused as taken.
    shutil.rmtree(work, ignore_errors=True)
    space = fixtures["fx"] / "yaml" / "kept.yaml"
    write_space(space, fixtures["world"], fixtures["model"], KEPT_EXTRA)
    proc = run_cli(["search", str(space), "--name", "kept", "--workdir", str(work)], env, root)
    if proc.returncode != 0:
        raise SystemExit(f"the reference sweep failed:\n{proc.stderr[-3000:]}")
    return work
