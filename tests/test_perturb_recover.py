"""Perturb-and-Recover against the official code's terms, each checked by a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cleansweep.methods import create_task, method_spec
from cleansweep.methods.perturb_recover import (
    ERASE_SCALE,
    NOISE_STD,
    capped_batch_distance,
    half_rectified_noise,
    par_augment,
)
from cleansweep.models import create_model

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _norm(raw: torch.Tensor) -> torch.Tensor:
    return (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _raw(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------ augmentation
def test_half_rectified_noise_only_brightens() -> None:
    raw = torch.tensor([0.9, 0.2, 0.5, 0.0])
    noise = torch.tensor([0.3, -0.1, 1.5, 0.25])
    # official: (x + noise.clip(0, 1)).clip(0, 1): 0.9+0.3 -> 1, negative noise -> +0, 1.5 -> +1 -> 1, 0+0.25
    assert torch.allclose(half_rectified_noise(raw, noise), torch.tensor([1.0, 0.2, 1.0, 0.25]))


def test_par_augment_noise_and_erasing_match_the_official_parameters() -> None:
    n, side = 400, 32
    images = _norm(torch.full((n, 3, side, side), 0.5))
    torch.manual_seed(0)
    out = par_augment(images, MEAN, STD)
    diff = _raw(out) - 0.5
    erased = (out.abs() < 1e-6).all(dim=1)  # value 0 after Normalize: the dataset mean colour, every channel
    noised = ((diff > 1e-4) & ~erased.unsqueeze(1)).flatten(1).any(dim=1)
    assert (diff[~erased.unsqueeze(1).expand_as(diff)] >= -1e-5).all()  # half-rectified: never darker
    assert 0.42 < noised.float().mean() < 0.58  # p 0.5 (binomial sd 0.025)
    increments = diff[noised][diff[noised] > 1e-4]
    # E[n | n > 0] = sigma * sqrt(2 / pi) for n ~ N(0, sigma^2), and about half the pixels of a noised image move
    assert increments.mean().item() == pytest.approx(NOISE_STD * math.sqrt(2 / math.pi), rel=0.05)
    assert (diff[noised] > 1e-4).float().mean().item() == pytest.approx(0.5, abs=0.02)
    counts = erased.flatten(1).sum(dim=1)
    assert 0.42 < (counts > 0).float().mean() < 0.58
    # A square: side round(sqrt(area * U(0.005, 0.01))) = 2 or 3 px of 32 x 32, so 4 or 9 pixels.
    lo, hi = (round(math.sqrt(side * side * s)) for s in ERASE_SCALE)
    assert set(counts[counts > 0].tolist()) <= {float(k * k) for k in range(lo, hi + 1)}
    for i in torch.nonzero(counts > 0).flatten()[:20].tolist():
        rows, cols = torch.nonzero(erased[i], as_tuple=True)
        assert rows.max() - rows.min() == cols.max() - cols.min()


# ------------------------------------------------------------------------------ the push term
def test_capped_batch_distance_is_the_official_thresholded_batch_mean() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # 1 - cos: 0, 1, 0.4 -> batch mean 0.4667; the official 0.5 * mean ||f - r||^2 is the same number.
    official = 0.5 * F.mse_loss(f, r, reduction="none").sum(dim=1).mean()
    assert official.item() == pytest.approx(1.4 / 3)
    for cap, expected in ((0.5, 1.4 / 3), (1.4 / 3, 1.4 / 3), (0.4, 0.0)):
        value = capped_batch_distance(f, r, cap)
        assert value.item() == pytest.approx(expected, abs=1e-7)
        (grad,) = torch.autograd.grad(value, [f])
        # below the cap: d/df_i of mean(1 - f_i . r_i) = -r_i / N; above it: no push at all
        torch.testing.assert_close(grad, -r / 3 if expected else torch.zeros_like(r))


# ------------------------------------------------------------------------------ the task
@pytest.fixture(scope="module")
def bundle():
    return create_model("tiny-rn", seed=0)


def _batch(tokenizer, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    words = ["red", "blue", "green", "circle", "square", "star"]
    return {"image": torch.randn(n, 3, 32, 32, generator=g),
            "text": tokenizer([f"a {words[i % 3]} {words[3 + i % 3]}" for i in range(n)])}


def _moved_task(bundle, **method):
    """A prepared PAR task after two SGD steps, so the model differs from its frozen start."""
    spec = method_spec({"name": "perturb_recover", **method})
    task = create_task(spec, create_model("tiny-rn", seed=0).model).train()
    task.prepare(torch.Generator().manual_seed(0))
    other = _batch(bundle.tokenizer, 8)
    other["image"] = other["image"].flip(0)
    for _ in range(2):
        task(other)["loss"].backward()
        with torch.no_grad():
            for p in task.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        task.zero_grad(set_to_none=True)
    return task


def test_loss_matches_hand_formula_on_the_augmented_batch(bundle) -> None:
    task = _moved_task(bundle, par_weight=0.7, par_cap=2.0)
    batch = _batch(bundle.tokenizer)
    torch.manual_seed(3)
    out = task(batch)
    torch.manual_seed(3)  # the same draws: the augmented images both terms saw
    images = par_augment(batch["image"], MEAN, STD)
    assert not torch.equal(images, batch["image"])
    start = create_model("tiny-rn", seed=0).model.eval()  # an independent copy of the frozen start, eval mode
    with torch.no_grad():
        img = F.normalize(task.model.encode_image(images), dim=-1)  # train mode, as the task ran
        txt = F.normalize(task.model.encode_text(batch["text"]), dim=-1)
        img0 = F.normalize(start.encode_image(images), dim=-1)
        txt0 = F.normalize(start.encode_text(batch["text"]), dim=-1)
        logits = task.model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(6)
    mmcl = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item() / 2
    push = (0.5 * (img - img0).pow(2).sum(1).mean() + 0.5 * (txt - txt0).pow(2).sum(1).mean()).item()
    assert push > 0.01
    assert out["mmcl_loss"].item() == pytest.approx(mmcl, rel=1e-4)
    assert out["par_loss"].item() == pytest.approx(push, rel=1e-4)
    assert out["loss"].item() == pytest.approx(mmcl - 0.7 * push, rel=1e-4)
    # A cap below the image push but above the text push drops the image term only (batch mean, not per sample).
    d_img, d_txt = (1 - (img * img0).sum(1)).mean().item(), (1 - (txt * txt0).sum(1)).mean().item()
    assert d_img != pytest.approx(d_txt, rel=0.05)
    cap = (d_img + d_txt) / 2
    capped = create_task(method_spec({"name": "perturb_recover", "par_weight": 0.7, "par_cap": cap}),
                         create_model("tiny-rn", seed=1).model).train()
    capped.load_state_dict(task.state_dict())
    torch.manual_seed(3)
    assert capped(batch)["par_loss"].item() == pytest.approx(min(d_img, d_txt), rel=1e-4)


def test_eval_mode_does_not_augment(bundle) -> None:
    task = _moved_task(bundle).eval()
    batch = _batch(bundle.tokenizer)
    first, second = task(batch)["loss"].item(), task(batch)["loss"].item()
    assert first == second


def test_logit_scale_does_not_train_and_frozen_model_stays_in_eval_mode(bundle) -> None:
    task = _moved_task(bundle)
    assert not task.frozen.training and task.training
    running = {k: v.clone() for k, v in task.frozen.state_dict().items()}
    out = task(_batch(bundle.tokenizer))
    out["loss"].backward()
    assert task.model.logit_scale.grad is not None and task.model.logit_scale.grad.item() == 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.visual.parameters())
    assert not task.frozen.training
    for key, value in task.frozen.state_dict().items():  # BatchNorm running statistics untouched
        torch.testing.assert_close(value, running[key], rtol=0, atol=0, msg=key)
    before = task.model.logit_scale.detach().clone()
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1, weight_decay=0.0)
    optimizer.step()
    assert torch.equal(task.model.logit_scale.detach(), before)
