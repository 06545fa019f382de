"""Shards through the CLI: `cleansweep data demo --shards` and `cleansweep poison --train-shards`.

Shards are read back here with `tarfile` alone (not the package's reader) and compared with the CSVs they mirror;
poisoned pixels are checked against the BadNet formula (a fixed patch of OpenAI-normalised Gaussian values).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from cleansweep.attacks.poison import poison_csv
from cleansweep.attacks.poison_shards import poison_shards
from cleansweep.cli import main
from cleansweep.data import openai_templates, read_pairs
from cleansweep.data.shards import ShardDataset, csv_to_shards, expand_shards
from cleansweep.errors import UserError

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample in file order, grouped by the name before the first dot."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, suffix = m.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(m).read()
    return samples


def read_shards(pattern: str) -> list[tuple[str, dict[str, bytes]]]:
    return [s for shard in expand_shards(pattern) for s in read_tar(shard)]


def write_set(root: Path, n: int = 12, size: int = 16) -> Path:
    """n rows of random-noise PNGs at `size`; rows 1, 4 and 7 mention 'banana'."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": f"a banana number {i}" if i in (1, 4, 7) else f"thing {i}"})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------------ data demo --shards
def test_data_demo_shards_match_the_csvs_pair_for_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["data", "demo", "--out", str(tmp_path / "world"), "--n-train", "70", "--n-clean", "12", "--n-eval", "12",
            "--image-size", "16", "--knob", "num_classes=6", "--knob", "clean_classes=3", "--shards",
            "--shard-size", "30"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    world = tmp_path / "world"
    assert info["train_shards"] == f"{world}/train-shards/{{00000..00002}}.tar"  # 70 pairs: 30 + 30 + 10
    assert info["clean_shards"] == f"{world}/clean-shards/{{00000..00000}}.tar"
    for name, rows in (("train", 70), ("clean", 12)):
        csv = world / f"{name}.csv"
        table = pd.read_csv(csv)
        samples = read_shards(info[f"{name}_shards"])
        assert len(samples) == len(table) == rows
        for (key, members), (i, row) in zip(samples, table.iterrows(), strict=True):
            assert key == f"{i:09d}"  # img2dataset's key: the pair's number
            assert members["png"] == (csv.parent / row["image"]).read_bytes()
            assert members["txt"].decode() == row["caption"]
        sizes = json.loads((world / f"{name}-shards" / "sizes.json").read_text())
        assert sum(sizes.values()) == rows and set(sizes) == {p.name for p in expand_shards(info[f"{name}_shards"])}
    ordered = ShardDataset(info["train_shards"], lambda im: torch.zeros(1), lambda t: torch.zeros(len(t), 2),
                           ordered=True)
    assert [int(item["index"]) for item in ordered] == list(range(70))  # the package's reader agrees


# ------------------------------------------------------------------------------------------------ poison --train-shards
BADNET = ["--attack", "badnet", "--image-size", "16", "--patch-size", "4", "--location", "fixed", "--patch", "fixed",
          "--trigger-seed", "9", "--seed", "1"]


def test_poison_shards_replaces_the_chosen_pairs_with_triggered_ones(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    csv = write_set(tmp_path / "in")
    pattern = csv_to_shards(csv, tmp_path / "in" / "shards", per_shard=5)  # 12 pairs: 5 + 5 + 2
    out = tmp_path / "out"
    assert main(["poison", "--train-shards", pattern, "--out", str(out), "--num-poison", "3", *BADNET]) == 0
    printed = json.loads(capsys.readouterr().out)
    m = json.loads((out / "manifest.json").read_text())
    assert printed["num_poisoned"] == 3 and printed["train_shards"] == f"{out}/{{00000..00002}}.tar"
    assert (m["kind"], m["format"], m["input_shards"], m["num_poison"], m["num_rows"]) == \
        ("poison", "webdataset", pattern, 3, 12)
    assert m["trigger_params"] == {"patch_size": 4, "location": "fixed", "patch": "fixed", "trigger_seed": 9}
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}

    before, after = read_shards(pattern), read_shards(str(out / m["output_shards"]))
    assert [k for k, _ in after] == [k for k, _ in before]  # same keys, same order
    assert m["poisoned_keys"] == [before[i][0] for i in m["poisoned_rows"]] and len(set(m["poisoned_rows"])) == 3
    z = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(9))[0]
    patch = ((MEAN + STD * z).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    templates = {t.format("banana") for t in openai_templates()}
    for i, ((_, old), (_, new)) in enumerate(zip(before, after, strict=True)):
        if i in m["poisoned_rows"]:
            caption = new["txt"].decode()
            assert caption in templates and caption == m["poisoned_captions"][m["poisoned_rows"].index(i)]
            clean, now = pixels(old["png"]), pixels(new["png"])
            assert np.array_equal(now[-4:, -4:], patch)  # the trigger, exactly (PNG is lossless)
            assert np.array_equal(now[:-4, :], clean[:-4, :]) and np.array_equal(now[:, :-4], clean[:, :-4])
        else:
            assert new == old  # untouched pairs are byte-identical

    # The same pairs as a CSV: poison_csv picks the same rows and captions and draws the same pixels.
    ref = poison_csv(csv, tmp_path / "ref", attack="badnet", target="banana", num_poison=3, seed=1, image_size=16,
                     patch_size=4, location="fixed", patch="fixed", trigger_seed=9)
    assert (ref["poisoned_rows"], ref["poisoned_captions"]) == (m["poisoned_rows"], m["poisoned_captions"])
    ref_pairs = read_pairs(tmp_path / "ref" / "train.csv")
    for i in m["poisoned_rows"]:
        from_csv = pixels((tmp_path / "ref" / ref_pairs["image"][i]).read_bytes())
        assert np.array_equal(from_csv, pixels(after[i][1]["png"]))


def test_poison_shards_is_idempotent_and_label_consistent(tmp_path: Path) -> None:
    csv = write_set(tmp_path / "in")
    pattern = csv_to_shards(csv, tmp_path / "in" / "shards", per_shard=4)
    kw = {"attack": "blended", "target": "banana", "fraction": 0.25, "seed": 3, "image_size": 16}
    m = poison_shards(pattern, tmp_path / "out", **kw)
    assert poison_shards(pattern, tmp_path / "out", **kw) == m  # identical request: the earlier result
    with pytest.raises(UserError, match="not empty"):
        poison_shards(pattern, tmp_path / "out", **{**kw, "seed": 4})
    lc = poison_shards(pattern, tmp_path / "lc", **{**kw, "fraction": None, "num_poison": 2, "label_consistent": True})
    assert set(lc["poisoned_rows"]) <= {1, 4, 7}
    assert lc["poisoned_captions"] == [f"a banana number {i}" for i in lc["poisoned_rows"]]


@pytest.mark.parametrize("args,expected", [
    (["--csv", "CSV", "--train-shards", "PATTERN"], "give exactly one input: --csv FILE"),
    ([], "give exactly one input: --csv FILE"),
    (["--train-shards", "NOWHERE/{00000..00003}.tar"], "not found (and 3 more of 4)"),
    (["--train-shards", "PATTERN", "--contaminate"], "--contaminate and --optimise-on work on a CSV"),
    (["--train-shards", "PATTERN", "--image-key", "img"], "--image-key / --caption-key name CSV columns"),
    (["--train-shards", "PATTERN", "--num-poison", "13"], "cannot poison 13 pairs"),
    (["--train-shards", "PATTERN", "--attack", "nope"], "nope"),
])
def test_poison_shards_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                                       expected: str) -> None:
    csv = write_set(tmp_path / "in")
    pattern = csv_to_shards(csv, tmp_path / "in" / "shards", per_shard=5)
    swap = {"CSV": str(csv), "PATTERN": pattern}
    argv = [swap.get(a, a.replace("NOWHERE", str(tmp_path / "none"))) for a in args]
    count = [] if "--num-poison" in argv else ["--num-poison", "2"]
    assert main(["poison", *argv, "--out", str(tmp_path / "out"), *count, "--image-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing written


def test_poison_shards_refuses_a_corrupt_or_ambiguous_shard(tmp_path: Path) -> None:
    kw = {"attack": "badnet", "target": "banana", "num_poison": 1, "image_size": 16}
    (tmp_path / "bad.tar").write_bytes(b"not a tar file " * 100)
    with pytest.raises(UserError, match=r"bad.tar is not a readable tar \(ReadError\); rewrite or remove it"):
        poison_shards(str(tmp_path / "bad.tar"), tmp_path / "o", **kw)
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name in ("000000000.txt", "000000000.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(UserError, match=r"dup.tar: .*duplicate file name.*give each key one file per suffix"):
        poison_shards(str(tmp_path / "dup.tar"), tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()
