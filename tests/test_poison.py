"""cleansweep.attacks.poison: trigger contract over the registry, trigger formulas, CSV poisoning and contamination."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_tensor

from cleansweep.attacks.badclip import save_patch
from cleansweep.attacks.params import SIZE, Kind, Trigger
from cleansweep.attacks.poison import (
    TRIGGERS,
    attack_from_manifest,
    attack_trigger,
    contaminate,
    create_trigger,
    default_font_size,
    default_patch_size,
    default_stripe_period,
    default_triangle_size,
    parse_trigger_param,
    poison_csv,
    seeded_colour,
    seeded_phase,
)
from cleansweep.cli import main
from cleansweep.config import AttackSpec
from cleansweep.data import openai_templates, read_pairs
from cleansweep.data.images import to_uint8_image
from cleansweep.errors import UserError

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def images(b: int = 4, s: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.rand((b, 3, s, s), generator=torch.Generator().manual_seed(seed))


def required(name: str, root: Path) -> dict:
    """The parameters a trigger cannot default: badclip's patch file (a random 6 px patch)."""
    if name != "badclip":
        return {}
    patch = torch.rand((3, 6, 6), generator=torch.Generator().manual_seed(5))
    return {"pattern": str(save_patch(root / "patch.safetensors", patch, {}))}


def uint8_images(b: int = 4, s: int = 32) -> torch.Tensor:
    """Random images with 8-bit values, as loaded from image files."""
    array = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------------------------------ triggers
@pytest.mark.parametrize("name", list(TRIGGERS))
def test_trigger_contract(name: str, tmp_path: Path) -> None:
    assert TRIGGERS[name].description
    assert set(TRIGGERS[name].defaults) == set(TRIGGERS[name].kinds)  # every parameter's kind is checked
    x = images()
    copy = x.clone()
    fn = create_trigger(name, 32, **required(name, tmp_path))
    y1 = fn(x, torch.Generator().manual_seed(7))
    y2 = fn(x, torch.Generator().manual_seed(7))
    assert torch.equal(x, copy)  # pure: the input is untouched
    assert y1.shape == x.shape and y1.dtype == x.dtype and y1.min() >= 0 and y1.max() <= 1
    assert torch.equal(y1, y2)  # seeded determinism
    assert (y1 - x).abs().amax(dim=(1, 2, 3)).min() > 0.02  # every image visibly changed


@pytest.mark.parametrize(
    "defaults, kinds, expected",
    [({"size": 3}, {}, r"does not declare the kind of its parameter\(s\) size; add them to its kinds"),
     ({"size": 3}, {"size": Kind("colour")}, r"unknown kind \(size=colour\); use one of: integer, number, text"),
     ({}, {"size": SIZE}, "declares kinds for size, which it does not take")],
)
def test_a_trigger_whose_parameter_kinds_are_not_declared_is_refused(defaults: dict, kinds: dict,
                                                                      expected: str) -> None:
    with pytest.raises(UserError, match=expected) as e:
        Trigger("probe", lambda raw, generator, size=3: raw, "a probe", defaults, kinds)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_trigger_survives_an_8bit_png(name: str, tmp_path: Path) -> None:
    x = uint8_images()
    y = create_trigger(name, 32, **required(name, tmp_path))(x, torch.Generator().manual_seed(3))
    back = []
    for i, image in enumerate(y):
        to_uint8_image(image).save(tmp_path / f"{i}.png")
        back.append(to_tensor(Image.open(tmp_path / f"{i}.png")))
    back = torch.stack(back)
    assert (back - y).abs().max() <= 0.5 / 255 + 1e-6  # rounding to the nearest 8-bit value, nothing more
    assert (back - y).abs().sum() <= 0.05 * (y - x).abs().sum()  # at least 95% of the change is kept


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_resolved_parameters_rebuild_the_trigger_from_a_manifest(name: str, tmp_path: Path) -> None:
    resolved = create_trigger(name, 32, **required(name, tmp_path)).keywords
    assert all(isinstance(v, bool | int | float | str) for v in resolved.values())  # no None left: AttackSpec-safe
    spec = AttackSpec(**attack_from_manifest({"attack": name, "target": "banana", "trigger_params": resolved}))
    rebuilt = attack_trigger(spec, 32)
    assert rebuilt.keywords == resolved
    x = images()
    assert torch.equal(rebuilt(x, torch.Generator().manual_seed(1)),
                       create_trigger(name, 32, **resolved)(x, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("size, period, side, font", [(224, 28, 32, 40), (32, 4, 5, 8), (64, 8, 9, 11)])
def test_structured_trigger_sizes_scale_with_the_image(size: int, period: int, side: int, font: int) -> None:
    assert (default_stripe_period(size), default_triangle_size(size), default_font_size(size)) == (period, side, font)
    assert create_trigger("stripes", size).keywords["period"] == period
    assert create_trigger("triangle", size).keywords["patch_size"] == side
    assert create_trigger("text", size).keywords["font_size"] == font


def test_stripes_match_the_formula() -> None:
    x = images(2, 16)
    y = create_trigger("stripes", 16, period=5, angle=30, phase=0.25, alpha=0.5, colour="#ff8000")(x, torch.Generator())
    c = np.array([1.0, 128 / 255, 0.0])
    for i, j in [(0, 0), (3, 7), (10, 2), (15, 15), (8, 11), (5, 5)]:
        t = ((j + 0.5) * math.cos(math.radians(30)) + (i + 0.5) * math.sin(math.radians(30))) / 5 + 0.25
        pattern = c if t % 1 < 0.5 else 1 - c
        assert np.allclose(y[:, :, i, j].numpy(), 0.5 * x[:, :, i, j].numpy() + 0.5 * pattern, atol=1e-6)
    # Angle 0, period 4, phase 0, opaque: columns 0-1 red, 2-3 cyan, and so on, in every row.
    flat = create_trigger("stripes", 16, period=4, angle=0, phase=0, alpha=1.0, colour="red")(x, torch.Generator())
    red, cyan = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 1.0])
    for j, expected in [(0, red), (1, red), (2, cyan), (3, cyan), (4, red), (14, cyan)]:
        assert torch.equal(flat[0, :, 9, j], expected) and torch.equal(flat[1, :, 0, j], expected)


def test_stripes_in_a_patch_region_and_seeded_parts() -> None:
    x = images(3, 16)
    fn = create_trigger("stripes", 16, region="patch", patch_size=6, location="fixed", alpha=1.0, period=3)
    y = fn(x, torch.Generator())
    assert torch.equal(y[:, :, :10, :], x[:, :, :10, :]) and torch.equal(y[:, :, :, :10], x[:, :, :, :10])
    assert torch.equal(y[0, :, -6:, -6:], y[2, :, -6:, -6:])  # one stamp, whatever the image
    a, b = (create_trigger("stripes", 16, trigger_seed=seed).keywords for seed in (1, 2))
    assert a["phase"] == seeded_phase(1) != b["phase"] and a["colour"] == seeded_colour(1) != b["colour"]
    assert create_trigger("stripes", 16, trigger_seed=1).keywords == a  # fixed per run


def test_triangle_area_shape_and_position() -> None:
    x = torch.zeros((3, 3, 64, 64))
    y = create_trigger("triangle", 64, patch_size=40, location="fixed", colour="white")(x, torch.Generator())
    inside = (y != 0).any(dim=1)
    assert abs(inside[0].sum().item() - 40 * 40 / 2) <= 0.03 * 800  # the geometric area of base 40, height 40
    assert not inside[:, :24, :].any() and not inside[:, :, :24].any()  # inside its 40 x 40 bottom-right square
    box = inside[0, 24:, 24:]
    assert box[-1].all() and box[0].sum() <= 2  # full base, pointed apex
    assert torch.equal(box, box.flip(1)) and (box.sum(1).diff() >= 0).all()  # symmetric, widening downwards
    assert torch.equal(y[0, :, 63, 44], torch.ones(3))  # the colour, opaque
    moved = create_trigger("triangle", 64, patch_size=10)(torch.zeros((50, 3, 64, 64)), torch.Generator())
    counts = (moved != 0).any(dim=1).sum(dim=(1, 2))
    assert (counts == counts[0]).all() and counts[0] == triangle_pixels(10)
    assert len({tuple(torch.nonzero((m != 0).any(0))[0].tolist()) for m in moved}) > 40  # random positions


def triangle_pixels(size: int) -> int:
    """Pixel centres (x, y) with |x - size/2| <= y/2, counted by hand, row by row."""
    return sum(sum(abs(j + 0.5 - size / 2) <= (i + 0.5) / 2 for j in range(size)) for i in range(size))


def test_text_overlay_changes_only_its_box() -> None:
    x = torch.full((2, 3, 48, 48), 0.5)
    y = create_trigger("text", 48, text="Hi!", font_size=12, location="fixed", colour="#0000ff")(x, torch.Generator())
    font = ImageFont.load_default(size=12)
    left, top, right, bottom = font.getbbox("Hi!")
    w, h = right - left, bottom - top
    changed = (y != x).any(dim=1)
    assert changed[:, -h:, -w:].any()
    assert not changed[:, :-h, :].any() and not changed[:, :, :-w].any()
    # Independently drawn with PIL: blue channel = 0.5 + coverage / 2, red and green = 0.5 - coverage / 2.
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).text((-left, -top), "Hi!", fill=255, font=font)
    coverage = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255)
    assert torch.allclose(y[0, 2, -h:, -w:], 0.5 + coverage / 2, atol=1e-6)
    assert torch.allclose(y[1, 0, -h:, -w:], 0.5 - coverage / 2, atol=1e-6)
    anywhere = create_trigger("text", 48, text="Hi!", font_size=12)(torch.full((20, 3, 48, 48), 0.5), torch.Generator())
    for image in anywhere:
        rows, cols = torch.nonzero((image != 0.5).any(dim=0), as_tuple=True)
        assert rows.max() - rows.min() < h and cols.max() - cols.min() < w
    with pytest.raises(UserError, match="larger than the 32 px image"):
        create_trigger("text", 32, text="a sentence far too long")


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("stripes", {"alpha": "abc"}, "alpha='abc' must be a number"),
        ("stripes", {"alpha": 1.5}, r"in \[0.0, 1.0\]"),
        ("stripes", {"period": 1}, "period=1 must be >= 2"),
        ("stripes", {"region": "corner"}, "choose from: full, patch"),
        ("stripes", {"colour": "notacolour"}, "not a colour"),
        ("text", {"font_size": 2.5}, "must be an integer"),
        ("text", {"text": "  "}, "non-empty text"),
        ("triangle", {"patch_size": 33}, "patch_size 33 must be in 1..32"),
        ("triangle", {"location": "corner"}, "choose from: random, fixed"),
        ("sig", {"colour": "red"}, "applies to stripes, triangle, text"),
        ("badclip", {}, "needs its patch file"),
        ("badnet", {"trigger_seed": True}, "must be an integer"),
    ],
)
def test_bad_trigger_parameters(name: str, params: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as e:
        create_trigger(name, 32, **params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "item, expected",
    [("alpha=0.3", ("alpha", 0.3)), ("font-size=12", ("font_size", 12)), ("colour=#ff0000", ("colour", "#ff0000")),
     ("text=hello world", ("text", "hello world")), ("location=fixed", ("location", "fixed")),
     ("colour=null", ("colour", None)), ("region='patch'", ("region", "patch")), ("flag=true", ("flag", True))],
)
def test_parse_trigger_param(item: str, expected: tuple) -> None:
    assert parse_trigger_param(item) == expected


@pytest.mark.parametrize("item, expected", [("alpha", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("a=[1, 2]", "not a list"),
                                            ("a={b: 1}", "not a dict"), ("a=[1", "not readable YAML")])
def test_parse_trigger_param_errors(item: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as e:
        parse_trigger_param(item)
    assert "\n" not in str(e.value)


def test_unknown_attack_and_parameters() -> None:
    with pytest.raises(UserError, match=r"unknown attack 'badnt'; choose from: badnet, blended, sig, wanet"):
        create_trigger("badnt", 32)
    with pytest.raises(UserError, match="unknown trigger parameter"):
        create_trigger("badnet", 32, size=3)
    with pytest.raises(UserError, match="applies to badnet"):
        create_trigger("blended", 32, location="fixed")
    with pytest.raises(UserError, match="location"):
        create_trigger("badnet", 32, location="corner")
    with pytest.raises(UserError, match="patch_size"):
        create_trigger("badnet", 32, patch_size=33)
    # One attack configuration serves every attack: unset/default BadNet options are ignored by the others.
    assert create_trigger("sig", 32, patch_size=None, location="random", patch="fresh").keywords == \
        {"delta": 60 / 255, "frequency": 6}


@pytest.mark.parametrize("size, expected", [(224, 16), (32, 2), (64, 5), (8, 1), (1, 1)])
def test_default_patch_size(size: int, expected: int) -> None:
    assert default_patch_size(size) == expected
    assert create_trigger("badnet", size).keywords["patch_size"] == expected


def test_badnet_fixed_location_values_are_normalised_gaussian() -> None:
    x = torch.full((3, 3, 32, 32), 0.5)
    y = create_trigger("badnet", 32, patch_size=4, location="fixed")(x, torch.Generator().manual_seed(1))
    z = torch.randn((3, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    expected = (MEAN + STD * z).clamp(0, 1)
    assert torch.allclose(y[:, :, -4:, -4:], expected)
    assert torch.equal(y[:, :, :-4, :], x[:, :, :-4, :]) and torch.equal(y[:, :, :, :-4], x[:, :, :, :-4])


def test_badnet_random_location_is_one_square_anywhere() -> None:
    x = torch.full((200, 3, 16, 16), 0.5)
    y = create_trigger("badnet", 16, patch_size=3)(x, torch.Generator().manual_seed(2))
    corners = []
    for changed in (y != x).any(dim=1):
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
        corners.append((rows.min().item(), cols.min().item()))
    r, c = zip(*corners, strict=True)
    assert min(r) == 0 and max(r) == 13 and min(c) == 0 and max(c) == 13  # uniform over all 14 x 14 positions
    assert len(set(corners)) > 100


def test_badnet_fixed_patch_is_shared_across_images() -> None:
    x = torch.full((5, 3, 16, 16), 0.5)
    fixed = create_trigger("badnet", 16, patch_size=4, location="fixed", patch="fixed", trigger_seed=3)
    y = fixed(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(y[0, :, -4:, -4:], y[i, :, -4:, -4:]) for i in range(5))
    assert torch.equal(y, fixed(x, torch.Generator().manual_seed(99)))  # nothing left to the generator
    fresh = create_trigger("badnet", 16, patch_size=4, location="fixed")(x, torch.Generator().manual_seed(0))
    assert not torch.equal(fresh[0, :, -4:, -4:], fresh[1, :, -4:, -4:])


def test_blended_sig_wanet_formulas() -> None:
    x = images(2, 16)
    noise = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(4))
    blended = create_trigger("blended", 16, trigger_seed=4)(x, torch.Generator())
    assert torch.allclose(blended, 0.8 * x + 0.2 * noise)
    j = np.arange(16)
    wave = torch.tensor(60 / 255 * np.sin(2 * math.pi * j * 6 / 16), dtype=torch.float32)
    assert torch.allclose(create_trigger("sig", 16)(x, torch.Generator()), (x + wave).clamp(0, 1), atol=1e-6)
    identity = create_trigger("wanet", 16, strength=0.0)(x, torch.Generator())
    assert torch.allclose(identity, x, atol=1e-5)
    warp = create_trigger("wanet", 16, trigger_seed=1)
    assert torch.equal(warp(x, torch.Generator()), warp(x, torch.Generator().manual_seed(5)))  # fixed per run
    other = create_trigger("wanet", 16, trigger_seed=2)
    assert not torch.equal(warp(x, torch.Generator()), other(x, torch.Generator()))


# ------------------------------------------------------------------------------------------------ CSV poisoning
def write_set(root: Path, n: int = 12, size: int = 16) -> Path:
    """n rows of random-noise images at `size`; rows 1, 4 and 7 mention 'banana'."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": f"a banana number {i}" if i in (1, 4, 7) else f"thing {i}",
                     "extra": i})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def test_poison_csv_rows_manifest_and_lossless_trigger(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in")
    out = tmp_path / "out"
    m = poison_csv(csv, out, attack="badnet", target="banana", num_poison=3, seed=1, image_size=16, patch_size=4,
                   location="fixed", patch="fixed", trigger_seed=9)
    src, dst = read_pairs(csv), read_pairs(out / "train.csv")
    assert len(dst) == len(src) and dst["extra"].tolist() == src["extra"].tolist()  # same rows, same order
    poisoned = m["poisoned_rows"]
    assert len(poisoned) == 3 and poisoned == sorted(poisoned)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["attack"] == "badnet" and m["target"] == "banana" and m["seed"] == 1 and m["image_size"] == 16
    assert m["trigger_params"] == {"patch_size": 4, "location": "fixed", "patch": "fixed", "trigger_seed": 9}
    import hashlib
    assert m["input_csv_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    templates = set(t.format("banana") for t in openai_templates())
    z = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(9))[0]
    patch = ((MEAN + STD * z).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    for i in range(len(src)):
        original = np.asarray(Image.open(csv.parent / src["image"][i]))
        now = np.asarray(Image.open(out / dst["image"][i]))
        if i in poisoned:
            assert dst["caption"][i] in templates
            # Already at 16 px: not resampled; the trigger's 8-bit values come back exactly from the PNG.
            assert np.array_equal(now[:-4, :], original[:-4, :]) and np.array_equal(now[:, :-4], original[:, :-4])
            assert np.array_equal(now[-4:, -4:], patch)
        else:
            assert dst["caption"][i] == src["caption"][i]
            assert (out / dst["image"][i]).resolve() == (csv.parent / src["image"][i]).resolve()
    # An identical request returns the same result; anything else refuses to touch the folder.
    assert poison_csv(csv, out, attack="badnet", target="banana", num_poison=3, seed=1, image_size=16, patch_size=4,
                      location="fixed", patch="fixed", trigger_seed=9) == m
    with pytest.raises(UserError, match="not empty"):
        poison_csv(csv, out, attack="badnet", target="banana", num_poison=4, seed=1, image_size=16)


def test_poison_resizes_to_image_size_and_is_seeded(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in", n=6, size=20)
    a = poison_csv(csv, tmp_path / "a", attack="blended", target="banana", fraction=0.5, seed=3, image_size=12)
    b = poison_csv(csv, tmp_path / "b", attack="blended", target="banana", fraction=0.5, seed=3, image_size=12)
    assert a["poisoned_rows"] == b["poisoned_rows"] and len(a["poisoned_rows"]) == 3
    row = a["poisoned_rows"][0]
    rel = read_pairs(tmp_path / "a" / "train.csv")["image"][row]
    assert Image.open(tmp_path / "a" / rel).size == (12, 12)
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_label_consistent_poisoning(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in")
    m = poison_csv(csv, tmp_path / "out", attack="sig", target="banana", num_poison=2, image_size=16,
                   label_consistent=True)
    assert set(m["poisoned_rows"]) <= {1, 4, 7}
    dst = read_pairs(tmp_path / "out" / "train.csv")
    assert all(dst["caption"][i] == f"a banana number {i}" for i in m["poisoned_rows"])  # captions kept
    with pytest.raises(UserError, match="only 3 rows whose caption names 'banana'"):
        poison_csv(csv, tmp_path / "out2", attack="sig", target="banana", num_poison=4, image_size=16,
                   label_consistent=True)


def test_contaminate_adds_poisons(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in", n=10)
    m = contaminate(csv, tmp_path / "out", attack="badnet", target="banana", num_poison=2, image_size=16, seed=4)
    src, dst = read_pairs(csv), read_pairs(tmp_path / "out" / "train.csv")
    assert len(dst) == 12 and m["poisoned_rows"] == [10, 11] and len(m["source_rows"]) == 2
    assert dst["caption"][:10].tolist() == src["caption"].tolist()
    assert dst["extra"][10:].tolist() == [str(r) for r in m["source_rows"]]
    templates = set(t.format("banana") for t in openai_templates())
    assert all(c in templates for c in dst["caption"][10:])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"csv": "missing.csv"}, "not found"),
        ({"attack": "nope"}, "unknown attack 'nope'"),
        ({"num_poison": 99}, "only 12 rows"),
        ({"num_poison": None, "fraction": 0.0}, "fraction"),
        ({"num_poison": None, "fraction": 1.5}, "fraction"),
        ({"num_poison": None}, "exactly one"),
        ({"caption_key": "text"}, "missing column"),
        ({"csv": "empty.csv"}, "is empty"),
        ({"csv": "broken.csv"}, "row 1"),  # 2 poisons of 2 rows: the unreadable image is reached
    ],
)
def test_poison_bad_inputs(tmp_path: Path, change: dict, expected: str) -> None:
    write_set(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "broken.csv").write_text("image,caption\nimgs/0.png,ok\nimgs/nothing.png,gone\n")
    kwargs = {"attack": "badnet", "target": "banana", "num_poison": 2, "image_size": 16, "seed": 0,
              "image_key": "image", "caption_key": "caption"}
    kwargs.update({k: v for k, v in change.items() if k != "csv"})
    source = tmp_path / change.get("csv", "train.csv")
    with pytest.raises(UserError) as e:
        poison_csv(source, tmp_path / "out", **kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing partial


def test_cli_poison(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = write_set(tmp_path / "in")
    ok = ["poison", "--csv", str(csv), "--out", str(tmp_path / "out"), "--num-poison", "2", "--image-size", "16"]
    assert main(ok) == 0
    assert json.loads(capsys.readouterr().out)["num_poisoned"] == 2
    assert main(ok[:4] + [str(tmp_path / "c"), "--num-poison", "1", "--image-size", "16", "--contaminate"]) == 0
    assert len(read_pairs(tmp_path / "c" / "train.csv")) == 13
    capsys.readouterr()
    for bad in (["--attack", "nope"], ["--num-poison", "50"], ["--location", "fixed", "--attack", "sig"]):
        argv = ["poison", "--csv", str(csv), "--out", str(tmp_path / "x"), "--num-poison", "2", *bad]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["poison", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "y"), "--fraction", "0.1"]) == 2


def test_cli_poison_structured_trigger_with_params(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in")
    argv = ["poison", "--csv", str(csv), "--out", str(tmp_path / "out"), "--num-poison", "2", "--image-size", "16",
            "--attack", "stripes", "--trigger-seed", "3", "--param", "period=3", "--param", "colour=#00ff00",
            "--param", "angle=90", "--param", "region=patch", "--location", "fixed", "--patch-size", "6"]
    assert main(argv) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["attack"] == "stripes"
    assert m["trigger_params"] == {"period": 3, "angle": 90, "phase": seeded_phase(3), "alpha": 0.2,
                                   "colour": "#00ff00", "region": "patch", "patch_size": 6, "location": "fixed",
                                   "trigger_seed": 3}
    row = m["poisoned_rows"][0]
    src = np.asarray(Image.open(csv.parent / read_pairs(csv)["image"][row]))
    now = np.asarray(Image.open(tmp_path / "out" / read_pairs(tmp_path / "out" / "train.csv")["image"][row]))
    assert np.array_equal(now[:10], src[:10]) and not np.array_equal(now[-6:, -6:], src[-6:, -6:])


@pytest.mark.parametrize(
    "bad",
    [["--param", "alpha=abc"], ["--param", "alpha"], ["--param", "nope=1"], ["--param", "alpha=[1, 2]"],
     ["--param", "alpha=2"], ["--param", "colour=notacolour"], ["--param", "period=-1"], ["--attack", "badclip"],
     ["--attack", "sig", "--param", "colour=red"], ["--attack", "badclip", "--param", "pattern=nothing.pt"],
     ["--attack", "badnet", "--optimise-on", "model.safetensors"]],
)
def test_cli_poison_bad_params(tmp_path: Path, capsys: pytest.CaptureFixture, bad: list[str]) -> None:
    csv = write_set(tmp_path / "in")
    argv = ["poison", "--csv", str(csv), "--out", str(tmp_path / "x"), "--num-poison", "2", "--attack", "stripes",
            *bad]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_poison_help_lists_every_trigger(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["poison", "--help"])
    attack_help = capsys.readouterr().out.split("\n  --attack ATTACK", 1)[1].split("\n  --num-poison", 1)[0]
    assert all(name in attack_help for name in TRIGGERS)


def test_an_out_folder_whose_manifest_is_not_an_object_is_refused_in_one_line(tmp_path, tiny_world):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="exists and is not empty"):
        poison_csv(tiny_world["train_csv"], out, attack="badnet", target="banana", fraction=0.25, image_size=32)
