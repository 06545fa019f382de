"""cleansweep.data on real files: CSV pairs and bad-image policies, evaluation folders, the synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from cleansweep import limits
from cleansweep.augment import eda
from cleansweep.cli import main
from cleansweep.data import EvalFolder, ImageCaptionDataset, collate_skip, make_demo_world, open_rgb, read_pairs
from cleansweep.data.images import BadImage
from cleansweep.data.synthetic import CLASS_GROUPS, class_table
from cleansweep.errors import UserError

TOKENIZE = open_clip.tokenize


def colour_of(i: int) -> tuple[int, int, int]:
    return (10 * i + 5, 255 - 10 * i, (37 * i) % 256)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_pairs(tmp_path: Path, n: int, *, corrupt: int | None = None, missing: int | None = None) -> Path:
    """n rows `img/i.png,row i caption` with solid colour_of(i) images; one truncated and one missing on request."""
    lines = ["image,caption"]
    for i in range(n):
        write_png(tmp_path / "img" / f"{i}.png", colour_of(i), (16, 16))
        lines.append(f"img/{i}.png,row {i} caption")
    if corrupt is not None:
        data = (tmp_path / "img" / f"{corrupt}.png").read_bytes()
        (tmp_path / "img" / f"{corrupt}.png").write_bytes(data[: len(data) // 2])
    if missing is not None:
        (tmp_path / "img" / f"{missing}.png").unlink()
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and ";" in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ CSV pairs
@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found"),
        ("", "is empty"),
        ("image,caption\n", "no rows"),
        ("path,text\na.png,hello\n", "missing column"),
        ("image,caption\na.png,hello\nb.png,\n", "row 1"),
        ("image,caption\na.png,hello\n,hello\n", "empty image path"),
    ],
)
def test_read_pairs_rejects_bad_csv(tmp_path: Path, content: str | None, expected: str) -> None:
    csv = tmp_path / "bad.csv"
    if content is not None:
        csv.write_text(content)
    with pytest.raises(UserError) as e:
        read_pairs(csv)
    msg = one_line_error(e)
    assert expected in msg and "bad.csv" in msg


def test_read_pairs_custom_columns_and_text_dtype(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("filepath,title,other\na.png,0123,x\nb.png,NA,y\n")
    df = read_pairs(csv, "filepath", "title")
    assert df["title"].tolist() == ["0123", "NA"]  # numbers and NA stay text


def test_truncated_png_fails_on_load(tmp_path: Path) -> None:
    csv = write_pairs(tmp_path, 3, corrupt=1)
    Image.open(tmp_path / "img" / "1.png")  # opening lazily succeeds: only load() notices the truncation
    with pytest.raises(BadImage):
        open_rgb(tmp_path / "img" / "1.png")
    assert csv.exists()


def test_skip_policy_counts_and_never_misaligns(tmp_path: Path) -> None:
    csv = write_pairs(tmp_path, 7, corrupt=2, missing=4)
    ds = ImageCaptionDataset(csv, transforms.PILToTensor(), TOKENIZE, on_bad_image="skip")
    assert ds[2] is None and ds[4] is None
    loader = DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_skip)
    batches = list(loader)
    assert [b["skipped"] for b in batches] == [1, 1, 0]
    seen = []
    for b in batches:
        for image, text, index in zip(b["image"], b["text"], b["index"].tolist(), strict=True):
            # The image's colour and the caption's tokens must both belong to the row named by `index`.
            assert image[:, 0, 0].tolist() == list(colour_of(index))
            assert torch.equal(text, TOKENIZE([f"row {index} caption"])[0])
            seen.append(index)
    assert seen == [0, 1, 3, 5, 6]


def test_all_skipped_batch_holds_only_the_count(tmp_path: Path) -> None:
    assert collate_skip([None, None]) == {"skipped": 2}


def test_fail_policy_names_row_and_path(tmp_path: Path) -> None:
    csv = write_pairs(tmp_path, 4, corrupt=2)
    ds = ImageCaptionDataset(csv, transforms.PILToTensor(), TOKENIZE, on_bad_image="fail")
    assert ds[1]["index"].item() == 1
    with pytest.raises(UserError) as e:
        ds[2]
    msg = one_line_error(e)
    assert "row 2" in msg and str(tmp_path / "img" / "2.png") in msg


def test_unknown_policy_is_a_user_error(tmp_path: Path) -> None:
    csv = write_pairs(tmp_path, 2)
    with pytest.raises(UserError, match="on_bad_image"):
        ImageCaptionDataset(csv, transforms.PILToTensor(), TOKENIZE, on_bad_image="ignore")


def test_ssl_views_seeded_per_row_and_epoch(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    write_png(tmp_path / "a.png", (200, 30, 30), (32, 32))
    caption = "a small photo of a red square on a plain background today"
    csv.write_text("image,caption\n" + "\n".join(f"a.png,{caption}" for _ in range(4)) + "\n")
    aug = transforms.Compose([transforms.RandomResizedCrop(16), transforms.ToTensor()])
    ds = ImageCaptionDataset(csv, transforms.Compose([transforms.Resize(16), transforms.ToTensor()]), TOKENIZE,
                             ssl_image_transform=aug, ssl_text_fn=eda, seed=3)
    a, b = ds[1], ds[1]
    assert set(a) == {"image", "text", "index", "image_aug", "text_aug"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    ds[0]
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    draws = {(ds[i]["image_aug"].sum().item(), tuple(ds[i]["text_aug"].tolist())) for i in range(4)}
    ds.set_epoch(1)
    draws |= {(ds[i]["image_aug"].sum().item(), tuple(ds[i]["text_aug"].tolist())) for i in range(4)}
    assert len(draws) > 4  # rows and epochs get different views


# ------------------------------------------------------------------------------------------- eval folders
def make_eval(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    for c, (folder, n) in enumerate(classes.items()):
        for i in range(n):
            write_png(root / folder / f"{i}.png", colour_of(c), size)


def test_eval_folder_mapping_and_raw_images(tmp_path: Path) -> None:
    make_eval(tmp_path, {"b_dog": 2, "a_cat": 3})
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    ds = EvalFolder(tmp_path, 10)
    assert ds.classnames == ["a cat", "b dog"]  # sorted folders; underscores read as spaces
    assert len(ds) == 5 and len(ds.templates) == 80 and ds.templates[0].count("{}") == 1
    assert ds.class_index("b dog") == 1 and ds.class_index("b_dog") == 1
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 10, 10) and image.dtype == torch.float32
        # Solid images survive resize + crop: raw values are the colour / 255 (no normalisation).
        colour = colour_of(1 if label == 0 else 0)  # b_dog was written first
        assert torch.allclose(image[:, 5, 5], torch.tensor(colour) / 255, atol=1 / 255)
    with pytest.raises(UserError, match="banana"):
        ds.class_index("banana")


def test_eval_folder_json_files_and_subset(tmp_path: Path) -> None:
    make_eval(tmp_path, {"x": 5, "y": 5})
    (tmp_path / "classnames.json").write_text(json.dumps({"x": "banana", "y": "tomato"}))
    (tmp_path / "templates.json").write_text(json.dumps(["a {}.", "the {}!"]))
    ds = EvalFolder(tmp_path, 8, subset=4, seed=1)
    assert ds.classnames == ["banana", "tomato"] and ds.templates == ["a {}.", "the {}!"]
    assert len(ds) == 4 and ds.samples == EvalFolder(tmp_path, 8, subset=4, seed=1).samples
    assert len(EvalFolder(tmp_path, 8, subset=100)) == 10


def test_eval_folder_imagenet_wnids(tmp_path: Path) -> None:
    make_eval(tmp_path, {"n07753592": 1, "n01440764": 1})
    ds = EvalFolder(tmp_path, 8)
    assert ds.classnames == ["tench", "banana"]  # open_clip's names, wnid (sorted) order


@pytest.mark.parametrize("case", ["missing", "no_classes", "no_images", "empty_class", "bad_names", "bad_templates"])
def test_eval_folder_rejects_bad_folders(tmp_path: Path, case: str) -> None:
    root = tmp_path / "eval"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        for folder in ("a", "b"):
            (root / folder).mkdir()
            (root / folder / "x.txt").write_text("x")
    if case in ("empty_class", "bad_names", "bad_templates"):
        make_eval(root, {"a": 1, "c": 1})
        if case == "empty_class":
            (root / "b").mkdir()
    if case == "bad_names":
        (root / "classnames.json").write_text('{"z": "zebra"}')
    if case == "bad_templates":
        (root / "templates.json").write_text('["no placeholder"]')
    with pytest.raises(UserError) as e:
        EvalFolder(root, 8)
    one_line_error(e)


def test_hidden_entries_are_not_classes_or_images(tmp_path: Path) -> None:
    """`.ipynb_checkpoints` (Jupyter), `._x.png` (macOS) and `.git` were classes and images; they are skipped."""
    root = tmp_path / ".cache" / "eval"  # a hidden folder above the root does not count
    make_eval(root, {"a": 2, "b": 1, ".ipynb_checkpoints": 1})
    write_png(root / "a" / "._0.png", (0, 0, 0))
    write_png(root / "b" / ".ipynb_checkpoints" / "0-checkpoint.png", (0, 0, 0))
    (root / ".git").mkdir()
    ds = EvalFolder(root, 8)
    assert ds.folders == ["a", "b"] and ds.classnames == ["a", "b"]
    assert sorted(Path(p).relative_to(root).as_posix() for p, _ in ds.samples) == ["a/0.png", "a/1.png", "b/0.png"]


@pytest.mark.parametrize("classes", [{"banana": 3}, {"banana": 3, ".ipynb_checkpoints": 1}])
def test_one_class_is_refused(tmp_path: Path, classes: dict[str, int], capsys: pytest.CaptureFixture) -> None:
    """One class gave ASR NaN (no image outside the target) and invalid JSON: refused, naming the class."""
    make_eval(tmp_path / "eval", classes)
    with pytest.raises(UserError) as e:
        EvalFolder(tmp_path / "eval", 8)
    assert "only the class 'banana'" in one_line_error(e) and "at least two classes" in str(e.value)


def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(tmp_path: Path) -> None:
    """16-bit PNGs came out 99% white (Pillow's convert clips at 255): 16-bit values v are v / 65535 of white."""
    values = np.array([[0, 1, 128, 129, 257, 4000, 32767, 32768], [40000, 65534, 65535, 12345, 6000, 100, 255, 256]],
                      dtype=np.uint16)
    values = np.tile(values, (4, 1))  # 8 x 8
    Image.fromarray(values).save(tmp_path / "grey16.png")
    expected = np.round(values.astype(np.float64) / 65535 * 255)  # the nearest 8-bit level, computed independently
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16"
    rgb = np.asarray(open_rgb(tmp_path / "grey16.png"))
    assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    # 16-bit PGM (Pillow mode 'I', already scaled to 0..65535 by its maxval) takes the same path.
    pgm = b"P5\n8 8\n65535\n" + values.astype(">u2").tobytes()
    (tmp_path / "grey16.pgm").write_bytes(pgm)
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "grey16.pgm"))[..., 1], expected)
    # Through an evaluation folder: raw floats are those levels / 255 (an 8 x 8 image at 8 px is not resampled).
    make_eval(tmp_path / "eval", {"a": 1, "b": 1})
    (tmp_path / "grey16.png").rename(tmp_path / "eval" / "a" / "0.png")
    image, label = EvalFolder(tmp_path / "eval", 8)[0]
    assert label == 0 and torch.allclose(image[0].double(), torch.from_numpy(expected) / 255, atol=1e-6)


@pytest.mark.parametrize("array", [np.full((4, 4), 70000, np.int32), np.full((4, 4), 0.5, np.float32)])
def test_pixels_without_a_known_white_level_are_refused(tmp_path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(BadImage, match="no known white level"):
        open_rgb(tmp_path / "x.tif")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height RGB pixels, with (almost) no pixel data: a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_an_image_declaring_huge_dimensions_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """A PNG declaring 144 megapixels was decoded (1.4 GB); the header alone is refused now, naming the size."""
    _png_header_only(tmp_path / "bomb.png", 12000, 12000)
    with pytest.raises(BadImage, match="declares 12000 x 12000 pixels, more than the 67,108,864 allowed"):
        open_rgb(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "past_pillow.png", 20000, 20000)  # past Pillow's own error bound too
    with pytest.raises(BadImage, match="more than the 67,108,864 pixels allowed"):
        open_rgb(tmp_path / "past_pillow.png")
    make_eval(tmp_path / "eval", {"a": 1, "b": 1})
    _png_header_only(tmp_path / "eval" / "a" / "0.png", 12000, 12000)
    with pytest.raises(UserError) as e:
        EvalFolder(tmp_path / "eval", 8)[0]
    assert "0.png" in one_line_error(e) and "cleansweep.limits.MAX_IMAGE_PIXELS" in str(e.value)
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 16 * 16 - 1)  # the bound is a setting, read at each call
    write_png(tmp_path / "small.png", (1, 2, 3), (16, 16))
    with pytest.raises(BadImage, match="declares 16 x 16 pixels, more than the 255 allowed"):
        open_rgb(tmp_path / "small.png")


# ------------------------------------------------------------------------------------------ synthetic world
SMALL = {"n_train": 60, "n_clean": 20, "n_eval": 60, "image_size": 16}


def test_class_table_structure() -> None:
    for k in (0, 1, 2):
        table = class_table(30, k)
        combos = {(c["shape"], c["colour"], c["pattern"]) for c in table}
        assert len(table) == 30 and len(combos) == 30, k  # every class a distinct combination
        assert table[0] == {"name": "banana", "shape": "crescent", "colour": "yellow", "pattern": "solid", "group": 0}
        for g in range(len(CLASS_GROUPS)):
            members = [c for c in table if c["group"] == g]
            assert len({c["shape"] for c in members}) == (1 if k >= 1 else 3)
            assert len({c["colour"] for c in members}) == (1 if k >= 2 else 3)


def test_demo_world_format_and_determinism(tmp_path: Path) -> None:
    a = make_demo_world(tmp_path / "a", seed=5, **SMALL)
    make_demo_world(tmp_path / "b", seed=5, **SMALL)
    make_demo_world(tmp_path / "c", seed=6, **SMALL)
    assert not a["reused"] and len(a["classes"]) >= 20
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "train.csv").read_text() != (tmp_path / "c" / "train.csv").read_text()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind

    train, clean = read_pairs(a["train_csv"]), read_pairs(a["clean_csv"])
    assert len(train) == 60 and len(clean) == 20 and not set(train["image"]) & set(clean["image"])
    image = np.asarray(Image.open(Path(a["out_dir"]) / train["image"][0]))
    assert image.shape == (16, 16, 3)
    ev = EvalFolder(a["eval_dir"], 16)
    names = [c["name"] for c in a["classes"]]
    assert ev.classnames == sorted(names) and "banana" in ev.classnames and len(ev) == 60
    assert np.bincount(ev.targets).tolist() == [2] * 30  # balanced
    assert ev.templates == a["eval_templates"]
    world = json.loads((tmp_path / "a" / "world.json").read_text())
    assert world["seed"] == 5 and world["knobs"]["clutter"] == a["knobs"]["clutter"]


def test_demo_world_reuse_and_conflicts(tmp_path: Path) -> None:
    first = make_demo_world(tmp_path / "w", **SMALL, num_classes=4)
    stamp = (tmp_path / "w" / "train.csv").stat().st_mtime_ns
    again = make_demo_world(tmp_path / "w", **SMALL, num_classes=4)
    assert again["reused"] and (tmp_path / "w" / "train.csv").stat().st_mtime_ns == stamp
    assert {k: v for k, v in again.items() if k not in ("reused", "seconds")} == \
        {k: v for k, v in first.items() if k not in ("reused", "seconds")}
    with pytest.raises(UserError, match="different world"):
        make_demo_world(tmp_path / "w", **SMALL, num_classes=5)
    with pytest.raises(UserError, match="unknown demo-world knob"):
        make_demo_world(tmp_path / "x", **SMALL, clutterr=2)
    with pytest.raises(UserError, match="noise"):
        make_demo_world(tmp_path / "x", **SMALL, noise=-1)


def test_demo_world_clean_classes_shift_only_the_clean_set(tmp_path: Path) -> None:
    sizes = {**SMALL, "n_clean": 40, "num_classes": 10}
    a = make_demo_world(tmp_path / "a", seed=3, **sizes, clean_classes=4)
    b = make_demo_world(tmp_path / "b", seed=3, **sizes, clean_classes=4)
    c = make_demo_world(tmp_path / "c", seed=4, **sizes, clean_classes=4)
    full = make_demo_world(tmp_path / "f", seed=3, **sizes)
    names = [cls["name"] for cls in a["classes"]]
    clean = read_pairs(a["clean_csv"])
    assert len(a["clean_class_names"]) == 4 and set(a["clean_class_names"]) <= set(names)
    assert sorted(set(clean["label"])) == sorted(a["clean_class_names"])
    assert clean["label"].value_counts().tolist() == [10] * 4  # balanced over the 4 classes
    assert b["clean_class_names"] == a["clean_class_names"] != c["clean_class_names"]  # seeded (seed 4 differs)
    assert (tmp_path / "a" / "clean.csv").read_text() == (tmp_path / "b" / "clean.csv").read_text()
    assert full["clean_class_names"] == names and set(read_pairs(full["clean_csv"])["label"]) == set(names)
    # Training and evaluation do not move: same bytes as the world without the knob.
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "f" / "train.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "a" / "eval").rglob("*.png")) == \
        sorted(p.name for p in (tmp_path / "f" / "eval").rglob("*.png"))
    assert json.loads((tmp_path / "a" / "world.json").read_text())["knobs"]["clean_classes"] == 4
    with pytest.raises(UserError, match=r"clean_classes=11 is out of range; use an integer in 0..num_classes \(10\)"):
        make_demo_world(tmp_path / "x", seed=3, **sizes, clean_classes=11)


@pytest.mark.parametrize("caption_noise", [0.0, 1.0])
def test_demo_world_caption_noise(tmp_path: Path, caption_noise: float) -> None:
    info = make_demo_world(tmp_path / "w", **SMALL, caption_noise=caption_noise)
    df = read_pairs(info["train_csv"])
    named = [f" {label} " in f" {cap.replace('.', ' ').replace(',', ' ').replace(':', ' ')} "
             for cap, label in zip(df["caption"], df["label"], strict=True)]
    assert all(named) if caption_noise == 0 else not any(named)


def test_demo_world_knobs_change_images(tmp_path: Path) -> None:
    plain = make_demo_world(tmp_path / "p", **SMALL, clutter=0, noise=0.0, jitter=0.0, colour_jitter=0.0)
    noisy = make_demo_world(tmp_path / "n", **SMALL, clutter=0, noise=0.3, jitter=0.0, colour_jitter=0.0)
    ev_p, ev_n = EvalFolder(plain["eval_dir"], 16), EvalFolder(noisy["eval_dir"], 16)
    # Same class, no jitter: the object sits in the same place; noise changes pixels by about its sd.
    diff = (ev_p[0][0] - ev_n[0][0]).abs().mean().item()
    assert 0.1 < diff < 0.35
    corner = ev_p[0][0][:, :2, :2]
    assert torch.allclose(corner, corner[:, :1, :1].expand_as(corner), atol=1 / 255)  # clean background


def test_cli_data_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["data", "demo", "--out", str(out), "--n-train", "30", "--n-clean", "10", "--n-eval", "30",
                 "--image-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["n_train"] == 30
    assert main(["data", "demo", "--out", str(tmp_path / "k"), "--n-train", "30", "--n-clean", "10", "--n-eval",
                 "30", "--image-size", "16", "--knob", "clutter=0", "--knob", "noise=0.05"]) == 0
    assert json.loads(capsys.readouterr().out)["knobs"]["clutter"] == 0
    assert main(["data", "demo", "--out", str(tmp_path / "k2"), "--knob", "clutter"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["data", "demo", "--out", str(tmp_path / "busy"), "--n-train", "30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    # pandas would keep the first `caption` and rename the second `caption.1`: which one was meant is a guess.
    from cleansweep.data.pairs import read_pairs

    path = tmp_path / "pairs.csv"
    path.write_text("image,caption,caption\na.png,first,second\n")
    with pytest.raises(UserError, match=r"'caption' appear more than once in its header \(line 1\)"):
        read_pairs(path)
    path.write_text("image,caption,caption.1\na.png,first,second\n")  # a column really named caption.1 is fine
    assert read_pairs(path) is not None
