"""AdamW parameter groups, user hyperparameters after a state load, and the LR schedule's endpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cleansweep.models import create_model
from cleansweep.optim import apply_hyperparameters, create_optimizer, lr_at


@pytest.fixture(scope="module")
def clip():
    return create_model("tiny-vit", seed=0).model


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_groups_follow_the_reference_rule(clip):
    opt = create_optimizer(clip, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    groups = _group_names(clip, opt)
    # Independent statement of the reference rule (open_clip / CleanCLIP): exclude ndim < 2, bn, ln, bias, logit_scale.
    reference_no_decay = {n for n, p in clip.named_parameters()
                          if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    assert groups["no_decay"] == reference_no_decay
    assert groups["decay"] == {n for n, _ in clip.named_parameters()} - reference_no_decay
    assert "logit_scale" in groups["no_decay"] and "text_projection" in groups["decay"]
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.2, "no_decay": 0.0}
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in opt.param_groups)


def test_batchnorm_of_resnet_is_not_decayed():
    model = create_model("tiny-rn", seed=0).model
    groups = _group_names(model, create_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8))
    assert "visual.bn1.weight" in groups["no_decay"] and "visual.conv1.weight" in groups["decay"]
    assert "visual.attnpool.positional_embedding" in groups["decay"]


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[0].weight.requires_grad_(False)
    opt = create_optimizer(model, lr=1.0, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    assert [g["name"] for g in opt.param_groups] == ["no_decay"]
    assert len(opt.param_groups[0]["params"]) == 3


def test_user_hyperparameters_win_over_a_loaded_state(clip):
    # The reference silently kept the checkpoint optimizer's weight decay: apply the user's after loading.
    saved = create_optimizer(clip, lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    opt = create_optimizer(clip, lr=1e-3, weight_decay=10.0, betas=(0.8, 0.95), eps=1e-6)
    opt.load_state_dict(saved.state_dict())
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # what torch does on its own
    apply_hyperparameters(opt, lr=1e-3, weight_decay=10.0, betas=(0.8, 0.95), eps=1e-6)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 10.0, "no_decay": 0.0}
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in opt.param_groups)


def test_weight_decay_reaches_the_update():
    # One AdamW step on a zero gradient: decayed weights shrink by lr * wd, the bias does not move.
    model = nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = create_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(model.bias.detach(), b0)


def _lrs(total, warmup, schedule="cosine"):
    return [lr_at(s, base_lr=1.0, warmup_steps=warmup, total_steps=total, schedule=schedule) for s in range(total)]


def test_warmup_endpoints():
    lrs = _lrs(100, 10)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10], strict=True))


def test_cosine_never_rises_after_warmup_and_ends_near_zero():
    lrs = _lrs(100, 10)
    after = lrs[9:]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    # The last step taken (99) is small but positive; step 100 (never taken) would be exactly 0.
    assert 0 < lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(100, base_lr=1.0, warmup_steps=10, total_steps=100) == 0.0
    assert lr_at(500, base_lr=1.0, warmup_steps=10, total_steps=100) == 0.0
    assert lrs[55] == pytest.approx(0.5)  # the midpoint of the cosine part


def test_constant_and_no_warmup():
    assert _lrs(5, 2, "constant") == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    lrs = _lrs(4, 0)
    assert lrs[0] == 1.0 and lrs == sorted(lrs, reverse=True)


def test_warmup_longer_than_run_and_bad_input():
    assert _lrs(3, 10) == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        lr_at(-1, base_lr=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(5, base_lr=1.0, warmup_steps=0, total_steps=10, schedule="linear")
