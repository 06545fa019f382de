"""cleansweep.attacks.badclip: the optimised patch on a tiny model, patch files, the badclip trigger,
`poison --optimise-on`."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from cleansweep.attacks.badclip import (
    PATCH_FILE,
    PatchImages,
    initial_patch,
    load_images,
    load_patch,
    optimise_patch,
    optimise_patch_for_checkpoint,
    patched_similarity,
    save_patch,
    target_text_features,
)
from cleansweep.attacks.badclip_objective import (
    Objective,
    augment_captions,
    augment_images,
    encode_captions,
    image_features,
    normalizer,
    patch_losses,
    triplet,
)
from cleansweep.attacks.poison import attack_from_manifest, attack_trigger, cached_patch, create_trigger
from cleansweep.augment import eda
from cleansweep.cli import main
from cleansweep.config import AttackSpec
from cleansweep.data import read_pairs
from cleansweep.errors import UserError
from cleansweep.models import ModelBundle, create_model, save_checkpoint


def calibrate_batchnorm(bundle: ModelBundle, raw: torch.Tensor) -> None:
    """Give a fresh model's BatchNorm layers the exact statistics of `raw` (one pass, cumulative average).

    Freshly initialised, BatchNorm in eval mode keeps mean 0 / variance 1, which shrinks tiny-rn's signal until
    every image embeds alike (pairwise cosine 0.9999): nothing a patch does could move the embedding. A trained
    victim has real statistics; one train-mode pass with momentum=None gives them without training any weight.
    """
    for module in bundle.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    bundle.model.train()
    with torch.no_grad():
        bundle.model.encode_image((raw - mean) / std)
    bundle.model.eval()


@pytest.fixture(scope="module")
def victim(tiny_world: dict[str, Any]) -> tuple[ModelBundle, PatchImages]:
    """tiny-rn (seed 0) with calibrated BatchNorm, and 12 non-target eval images of the tiny world (32 px)."""
    bundle = create_model("tiny-rn", seed=0)
    pool = load_images(tiny_world["eval_dir"], 32, "banana", max_images=12)
    calibrate_batchnorm(bundle, pool.images)
    return bundle, pool


@pytest.fixture(scope="module")
def checkpoint(victim: tuple[ModelBundle, PatchImages], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "victim.safetensors", victim[0].model, {"step": 0})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ optimisation
def test_target_text_features_and_similarity_match_hand_computations(victim: tuple[ModelBundle, PatchImages]) -> None:
    bundle, pool = victim
    model, templates = bundle.model, pool.templates[:3]
    text = target_text_features(model, bundle.tokenizer, "banana", templates, "cpu")
    with torch.no_grad():
        prompts = F.normalize(model.encode_text(bundle.tokenizer([t.format("banana") for t in templates])), dim=-1)
        patched = pool.images.clone()
        patch = initial_patch(5, torch.Generator().manual_seed(0))
        patched[:, :, -5:, -5:] = patch
        mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
        feats = F.normalize(model.encode_image((patched - mean) / std), dim=-1)
    assert torch.allclose(text, F.normalize(prompts.mean(0), dim=0), atol=1e-5)
    expected = (feats @ text).mean().item()
    got = patched_similarity(model, pool.images, patch, text, location="fixed", normalize=(bundle.mean, bundle.std))
    assert got == pytest.approx(expected, abs=1e-5)


def _objective(bundle: ModelBundle, pool: PatchImages, patch: torch.Tensor, weight: float = 500.0) -> float:
    """infonce + weight * triplet over all 12 images at the fixed corner, captions i -> template i % T, positives
    i -> target image i % M: one deterministic evaluation of the official objective."""
    model, n, p = bundle.model, len(pool.images), patch.shape[-1]
    captions = [pool.templates[i % len(pool.templates)].format("banana") for i in range(n)]
    norm = normalizer((bundle.mean, bundle.std), torch.device("cpu"))
    with torch.no_grad():
        text = encode_captions(model, bundle.tokenizer, captions, torch.device("cpu"))
        positives = image_features(model, pool.target_images, norm, torch.device("cpu"))
        parts = patch_losses(model, pool.images, patch, [32 - p] * n, [32 - p] * n, text,
                             positives[torch.arange(n) % len(positives)], norm, float(model.logit_scale), 1.0)
    return (parts["infonce"] + weight * parts["triplet"]).item()


def test_optimised_patch_lowers_the_official_objective(victim: tuple[ModelBundle, PatchImages]) -> None:
    bundle, pool = victim
    norm = (bundle.mean, bundle.std)
    patch = optimise_patch(bundle.model, bundle.tokenizer, pool.images, "banana", pool.templates, patch_size=8,
                           location="fixed", steps=5, lr=0.1, batch_size=12, normalize=norm,
                           target_images=pool.target_images)
    assert patch.shape == (3, 8, 8) and patch.dtype == torch.float32 and patch.min() >= 0 and patch.max() <= 1
    randoms = [_objective(bundle, pool, initial_patch(8, torch.Generator().manual_seed(s))) for s in range(3)]
    assert _objective(bundle, pool, patch) < 0.85 * min(randoms)  # measured: 661 against 927-945


def test_triplet_term_pulls_towards_target_images(victim: tuple[ModelBundle, PatchImages]) -> None:
    bundle, pool = victim
    norm = (bundle.mean, bundle.std)
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = F.normalize(bundle.model.encode_image((pool.target_images - mean) / std), dim=-1)
    anchor = F.normalize(feats.mean(0), dim=0)
    near = [patched_similarity(bundle.model, pool.images, optimise_patch(
        bundle.model, bundle.tokenizer, pool.images, "banana", pool.templates, patch_size=8, location="fixed", steps=5,
        lr=0.1, batch_size=12, normalize=norm, target_images=pool.target_images,
        objective=Objective(triplet_weight=weight)), anchor, location="fixed", normalize=norm)
        for weight in (0.0, 500.0)]
    assert near[1] > near[0] + 0.03  # measured: 0.26 with InfoNCE only, 0.31 with the triplet term
    with pytest.raises(UserError, match="needs target-class images"):
        optimise_patch(bundle.model, bundle.tokenizer, pool.images, "banana", pool.templates, patch_size=8, steps=1)


def test_triplet_term_matches_hand_formula() -> None:
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[3.0, 4.0], [1.0, 0.5]])
    n = torch.tensor([[0.0, 1.0], [1.0, 3.0]])
    # row 0: max(5 - 1 + 1, 0) = 5; row 1: max(0.5 - 3 + 1, 0) = 0 -> mean 2.5 (torch adds eps 1e-6 inside the norm)
    assert triplet(a, p, n, margin=1.0).item() == pytest.approx(2.5, abs=1e-5)
    assert triplet(a, p, n, margin=3.0).item() == pytest.approx((7 + 0.5) / 2, abs=1e-5)


def test_patch_losses_match_hand_computations(victim: tuple[ModelBundle, PatchImages]) -> None:
    bundle, pool = victim
    model, raw = bundle.model, pool.images[:5]
    patch = initial_patch(6, torch.Generator().manual_seed(4))
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    captions = [t.format("banana") for t in pool.templates[:5]]
    with torch.no_grad():
        patched = raw.clone()
        for i, (r, c) in enumerate(((0, 0), (3, 7), (26, 26), (10, 2), (5, 20))):
            patched[i, :, r:r + 6, c:c + 6] = patch
        a = F.normalize(model.encode_image((patched - mean) / std), dim=-1)
        clean = F.normalize(model.encode_image((raw - mean) / std), dim=-1)
        t = F.normalize(model.encode_text(bundle.tokenizer(captions)), dim=-1)
        pos = F.normalize(model.encode_image((pool.target_images[:5] - mean) / std), dim=-1)
        parts = patch_losses(model, raw, patch, [0, 3, 26, 10, 5], [0, 7, 26, 2, 20], t, pos,
                             normalizer((bundle.mean, bundle.std), torch.device("cpu")), 1.3, 0.7)
    logits = math.exp(1.3) * a @ t.T
    infonce = sum(-torch.log_softmax(logits, 1)[i, i] - torch.log_softmax(logits.T, 1)[i, i] for i in range(5)) / 10
    hinge = ((a - pos).norm(dim=1) - (a - clean).norm(dim=1) + 0.7).clamp(min=0).mean()
    assert parts["infonce"].item() == pytest.approx(infonce.item(), rel=1e-5)
    assert parts["triplet"].item() == pytest.approx(hinge.item(), rel=1e-4)
    assert 0 < (a - clean).norm(dim=1).min()  # the negative is the clean image, not the patched one


def test_augmentations_are_seeded_and_leave_the_global_rng_alone(victim: tuple[ModelBundle, PatchImages]) -> None:
    _, pool = victim
    rng = torch.get_rng_state()
    first = augment_images(pool.images, torch.Generator().manual_seed(0))
    again = augment_images(pool.images, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(first, again)
    assert first.shape == pool.images.shape and 0 <= first.min() and first.max() <= 1
    quantised = (pool.images * 255).round() / 255
    assert sum(not torch.allclose(x, y) for x, y in zip(first, quantised, strict=True)) >= 6  # AutoAugment acts
    captions = ["a photo of a banana on the table", "the ripe banana"]
    assert augment_captions(captions, random.Random(5)) == [eda(c, r) for r in [random.Random(5)] for c in captions]


def test_optimise_patch_is_seeded_and_leaves_model_and_rng_alone(victim: tuple[ModelBundle, PatchImages]) -> None:
    bundle, pool = victim
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    bundle.model.train()
    rng = torch.get_rng_state()
    try:
        run = [optimise_patch(bundle.model, bundle.tokenizer, pool.images, "banana", pool.templates[:2], patch_size=4,
                              steps=3, seed=seed, batch_size=4, normalize=(bundle.mean, bundle.std),
                              target_images=pool.target_images, objective=Objective(eda_prob=1.0, aug_prob=1.0))
               for seed in (0, 0, 1)]
        assert bundle.model.training  # mode restored
    finally:
        bundle.model.eval()
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    assert torch.equal(torch.get_rng_state(), rng)  # no global RNG draw
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())
    assert all(p.grad is None for p in bundle.model.parameters())
    with pytest.raises(UserError, match="at least one image"):
        optimise_patch(bundle.model, bundle.tokenizer, pool.images[:0], "banana", pool.templates, patch_size=4)


# ------------------------------------------------------------------------------------------------ patch files
def test_save_and_load_patch(tmp_path: Path) -> None:
    patch = torch.rand((3, 5, 5), generator=torch.Generator().manual_seed(0))
    path = save_patch(tmp_path / "p.safetensors", patch, {"target": "banana", "steps": 3})
    assert torch.equal(load_patch(path), patch)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card == {"target": "banana", "steps": 3, "patch_size": 5, "weights": "p.safetensors",
                    "sha256": sha256(path)}
    with pytest.raises(UserError, match="must end in .safetensors"):
        save_patch(tmp_path / "p.pt", patch, {})
    with pytest.raises(UserError, match=r"\(3, p, p\) tensor"):
        save_patch(tmp_path / "q.safetensors", patch * 2, {})


class _Marker:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize(
    "make, expected",
    [
        ("pickle", "not a readable safetensors file"),
        ("pt", "is not a .safetensors file"),
        ("missing", "not found"),
        ("no_patch", "no 'patch' tensor"),
        ("bad_shape", r"\(3, p, p\) tensor"),
    ],
)
def test_load_patch_refuses_what_is_not_a_patch(tmp_path: Path, make: str, expected: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / ("evil.pt" if make == "pt" else "evil.safetensors")
    if make in ("pickle", "pt"):
        path.write_bytes(pickle.dumps({"patch": _Marker(marker)}))
    elif make == "no_patch":
        safetensors.torch.save_file({"weights": torch.rand(3, 4, 4)}, str(path))
    elif make == "bad_shape":
        safetensors.torch.save_file({"patch": torch.rand(3, 4, 5)}, str(path))
    with pytest.raises(UserError, match=expected) as e:
        load_patch(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_badclip_trigger_pastes_the_cached_patch(tmp_path: Path) -> None:
    patch = torch.rand((3, 6, 6), generator=torch.Generator().manual_seed(1))
    path = save_patch(tmp_path / "p.safetensors", patch, {})
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    fixed = create_trigger("badclip", 32, pattern=str(path), location="fixed")
    assert fixed.keywords == {"pattern": str(path), "pattern_sha256": sha256(path), "patch_size": 6,
                              "location": "fixed"}
    y = fixed(x, torch.Generator())
    assert torch.equal(y[:, :, -6:, -6:], patch.expand(4, -1, -1, -1))
    assert torch.equal(y[:, :, :26], x[:, :, :26]) and torch.equal(y[:, :, :, :26], x[:, :, :, :26])
    anywhere = create_trigger("badclip", 32, pattern=str(path))(x, torch.Generator().manual_seed(0))
    for image, clean in zip(anywhere, x, strict=True):
        rows, cols = torch.nonzero((image != clean).any(dim=0), as_tuple=True)
        r, c = rows.min().item(), cols.min().item()
        assert torch.equal(image[:, r:r + 6, c:c + 6], patch)
    first = cached_patch(path)[0]
    assert cached_patch(path)[0] is first  # read once per path, size and mtime
    save_patch(path, 1 - patch, {})  # rewritten: read again, and the recorded sha256 no longer matches
    assert torch.equal(cached_patch(path)[0], 1 - patch)
    with pytest.raises(UserError, match="not the expected"):
        create_trigger("badclip", 32, pattern=str(path), pattern_sha256=fixed.keywords["pattern_sha256"])
    with pytest.raises(UserError, match="changed"):
        fixed(x, torch.Generator())
    with pytest.raises(UserError, match="not patch_size 4"):
        create_trigger("badclip", 32, pattern=str(path), patch_size=4)


# ------------------------------------------------------------------------------------------------ from files
def test_optimise_patch_for_checkpoint_writes_patch_and_card(checkpoint: Path, tiny_world: dict[str, Any],
                                                             tmp_path: Path) -> None:
    card = optimise_patch_for_checkpoint(checkpoint, tiny_world["eval_dir"], "banana", tmp_path / "p.safetensors",
                                         patch_size=8, location="fixed", steps=5, lr=0.1, max_images=12,
                                         device="cpu")
    assert card["model"] == "tiny-rn" and card["model_sha256"] == sha256(checkpoint) and card["target"] == "banana"
    assert card["steps"] == 5 and card["patch_size"] == 8 and card["sha256"] == sha256(tmp_path / "p.safetensors")
    assert card["num_images"] == 12 and card["num_target_images"] == 6 and card["num_templates"] == 8
    assert card["objective"] == "badclip-infonce-triplet" and card["captions"] == "templates"
    assert (card["triplet_weight"], card["margin"], card["eda_prob"], card["aug_prob"]) == (500.0, 1.0, 0.1, 0.5)
    assert card["logit_scale"] == pytest.approx(math.log(1 / 0.07)) and card["batch_size"] == 64
    assert all(math.isfinite(card[f"{k}_similarity"]) for k in ("clean", "initial", "final"))
    assert load_patch(tmp_path / "p.safetensors").shape == (3, 8, 8)
    pool = load_images(tiny_world["train_csv"], 32, "banana", max_images=8)  # a CSV: target rows by caption
    assert len(pool.images) == 8 and pool.target_images is not None and len(pool.templates) == 80
    captions = read_pairs(tiny_world["train_csv"])["caption"]
    assert 0 < len(pool.target_images) == min(8, sum(bool(re.search(r"\bbanana\b", c.lower())) for c in captions))
    assert len(pool.captions) == len(pool.target_images) and all("banana" in c.lower() for c in pool.captions)


def test_cli_poison_optimise_on(checkpoint: Path, tiny_world: dict[str, Any], tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "poisoned"
    argv = ["poison", "--csv", tiny_world["train_csv"], "--out", str(out), "--num-poison", "2", "--optimise-on",
            str(checkpoint), "--optimise-steps", "3", "--optimise-images", tiny_world["eval_dir"], "--location",
            "fixed", "--patch-size", "8", "--optimise-device", "cpu"]
    assert main(argv) == 0
    manifest_bytes = (out / "manifest.json").read_bytes()
    m = json.loads(manifest_bytes)
    pattern = out / PATCH_FILE
    assert m["attack"] == "badclip" and m["image_size"] == 32  # the model's resolution
    assert m["trigger_params"] == {"pattern": str(pattern), "pattern_sha256": sha256(pattern), "patch_size": 8,
                                   "location": "fixed"}
    card = json.loads(pattern.with_suffix(".json").read_text())
    assert card["steps"] == 3 and card["model_sha256"] == sha256(checkpoint)
    patch = (load_patch(pattern) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    rows = read_pairs(out / "train.csv")["image"]
    for row in m["poisoned_rows"]:
        assert np.array_equal(np.asarray(Image.open(out / rows[row]))[-8:, -8:], patch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned"]  # no staging folder left behind
    spec = AttackSpec(**attack_from_manifest(m))  # what pre-training and cleaning evaluate the ASR with
    assert attack_trigger(spec, 32).keywords == m["trigger_params"]
    capsys.readouterr()
    mtime = pattern.stat().st_mtime_ns
    assert main(argv) == 0  # identical request: the same result, not optimised again
    assert (out / "manifest.json").read_bytes() == manifest_bytes and pattern.stat().st_mtime_ns == mtime
    assert main([*argv, "--optimise-steps", "4"]) == 2  # another patch would overwrite the folder
    assert "not empty" in capsys.readouterr().err
    bad = [*argv, "--image-size", "224"]
    bad[4] = str(tmp_path / "other")
    assert main(bad) == 2
    assert "differs from the checkpoint model's 32 px" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned"]
