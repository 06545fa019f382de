"""cleansweep.poison: trigger contract over the registry, trigger formulas, CSV poisoning and contamination."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from cleansweep.cli import main
from cleansweep.data import openai_templates, read_pairs
from cleansweep.errors import UserError
from cleansweep.poison import TRIGGERS, contaminate, create_trigger, default_patch_size, poison_csv

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def images(b: int = 4, s: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.rand((b, 3, s, s), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ triggers
@pytest.mark.parametrize("name", list(TRIGGERS))
def test_trigger_contract(name: str) -> None:
    assert TRIGGERS[name].description
    x = images()
    copy = x.clone()
    fn = create_trigger(name, 32)
    y1 = fn(x, torch.Generator().manual_seed(7))
    y2 = fn(x, torch.Generator().manual_seed(7))
    assert torch.equal(x, copy)  # pure: the input is untouched
    assert y1.shape == x.shape and y1.dtype == x.dtype and y1.min() >= 0 and y1.max() <= 1
    assert torch.equal(y1, y2)  # seeded determinism
    assert (y1 - x).abs().amax(dim=(1, 2, 3)).min() > 0.02  # every image visibly changed


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
