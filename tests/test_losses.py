"""Losses against hand-written formulas (numpy, explicit loops) and the DDP gather on a real 2-process gloo group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cleansweep.losses import capped_distance, cluster_loss, gather_features, l2_to_init, mmcl_loss, ssl_loss


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


def _ce_rows(logits: np.ndarray) -> float:
    """Mean over rows i of -log softmax(logits[i])[i], with an explicit loop and a stable log-sum-exp."""
    total = 0.0
    for i in range(logits.shape[0]):
        row = logits[i]
        m = row.max()
        total += -(row[i] - (m + math.log(np.exp(row - m).sum())))
    return total / logits.shape[0]


def test_mmcl_matches_hand_formula():
    img, txt, s = _unit(5, 4, 0), _unit(5, 4, 1), 2.3
    logits = math.exp(s) * img.numpy() @ txt.numpy().T
    expected = (_ce_rows(logits) + _ce_rows(logits.T)) / 2
    assert mmcl_loss(img, txt, torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-10)


def test_mmcl_is_symmetric_and_log_n_at_zero_scale():
    img, txt = _unit(6, 3, 2), _unit(6, 3, 3)
    s = torch.tensor(1.7, dtype=torch.float64)
    torch.testing.assert_close(mmcl_loss(img, txt, s), mmcl_loss(txt, img, s))
    # Scale exp(-inf) = 0: all logits equal, so each CE is log N.
    assert mmcl_loss(img, txt, torch.tensor(-math.inf)).item() == pytest.approx(math.log(6))


def test_mmcl_takes_the_log_scale():
    img = _unit(4, 8, 4)
    # Perfectly paired, nearly orthogonal rows: the loss falls as the (log) scale grows.
    low = mmcl_loss(img, img, torch.tensor(0.0)).item()
    high = mmcl_loss(img, img, torch.tensor(math.log(100))).item()
    assert high < low
    logits = 100 * img.numpy() @ img.numpy().T
    assert high == pytest.approx((_ce_rows(logits) + _ce_rows(logits.T)) / 2, rel=1e-8)


def test_mmcl_gradients_reach_features_and_scale():
    img = _unit(4, 3, 5).requires_grad_()
    txt = _unit(4, 3, 6).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    mmcl_loss(img, txt, scale).backward()
    for t in (img, txt, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_mmcl_gradcheck():
    img, txt = _unit(3, 4, 7).requires_grad_(), _unit(3, 4, 8).requires_grad_()
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mmcl_loss, (img, txt, scale))


def test_ssl_is_one_direction():
    feats, aug, s = _unit(5, 4, 9), _unit(5, 4, 10), 1.1
    scale = torch.tensor(s, dtype=torch.float64)
    logits = math.exp(s) * feats.numpy() @ aug.numpy().T
    assert ssl_loss(feats, aug, scale).item() == pytest.approx(_ce_rows(logits), rel=1e-10)
    # One direction only: swapping the views computes the transposed problem, a different number here.
    assert ssl_loss(aug, feats, scale).item() == pytest.approx(_ce_rows(logits.T), rel=1e-10)
    assert abs(_ce_rows(logits) - _ce_rows(logits.T)) > 1e-6


def test_ssl_gradients():
    feats, aug = _unit(4, 3, 11).requires_grad_(), _unit(4, 3, 12).requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ssl_loss(feats, aug, scale).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (feats, aug, scale))


def test_cluster_loss_is_mean_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    lg = logits.numpy()
    expected = np.mean([-(lg[i, labels[i]] - np.log(np.exp(lg[i]).sum())) for i in range(6)])
    assert cluster_loss(logits, labels).item() == pytest.approx(expected, rel=1e-10)


def test_l2_to_init_is_sum_of_squares_with_gradient_2_delta():
    p = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    p0 = [torch.tensor([0.5, 2.0]), torch.tensor([[1.0]])]
    loss = l2_to_init(p, p0)
    assert loss.item() == pytest.approx(0.5**2 + 0.0 + 2.0**2)
    loss.backward()
    torch.testing.assert_close(p[0].grad, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(p[1].grad, torch.tensor([[4.0]]))
    assert l2_to_init(p0, p0).item() == 0.0


def test_l2_to_init_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        l2_to_init([torch.ones(1)], [torch.ones(1), torch.ones(1)])


def _hand_cosine_distances(f: np.ndarray, r: np.ndarray) -> list[float]:
    """1 - f_i . r_i / (|f_i| |r_i|) per row, with explicit loops."""
    out = []
    for i in range(f.shape[0]):
        dot = sum(f[i, j] * r[i, j] for j in range(f.shape[1]))
        out.append(1 - dot / (math.sqrt((f[i] ** 2).sum()) * math.sqrt((r[i] ** 2).sum())))
    return out


def test_capped_distance_matches_hand_formula():
    f, r = _unit(7, 4, 30), _unit(7, 4, 31)
    d = _hand_cosine_distances(f.numpy(), r.numpy())
    cap = float(np.median(d))
    assert min(d) < cap < max(d)  # both regimes occur
    expected = sum(min(x, cap) for x in d) / len(d)
    assert capped_distance(f, r, cap).item() == pytest.approx(expected, rel=1e-12)
    assert capped_distance(f, r, 2.0).item() == pytest.approx(sum(d) / len(d), rel=1e-12)  # 2 caps nothing
    assert capped_distance(f, f, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_capped_distance_stops_pushing_beyond_the_cap():
    f, r = _unit(8, 5, 32).requires_grad_(), _unit(8, 5, 33).requires_grad_()
    d = _hand_cosine_distances(f.detach().numpy(), r.detach().numpy())
    cap = float(np.median(d))
    capped_distance(f, r, cap).backward()
    for i, x in enumerate(d):
        # d_i = 1 - f_i . r_i: below the cap its gradient is -r_i / N; beyond it, nothing.
        expected = torch.zeros(5, dtype=torch.float64) if x > cap else -r[i].detach() / 8
        torch.testing.assert_close(f.grad[i], expected, rtol=0, atol=1e-15)
    assert sum(x > cap for x in d) == 4
    assert r.grad is None  # the frozen reference never receives a gradient


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_features(x) is x


# ------------------------------------------------------------------------------ a real 2-process gloo group
GLOBAL_ROWS, DIM = 5, 4
SPLIT = {0: slice(0, 3), 1: slice(3, 5)}  # unequal local batches (a rank that dropped a bad image)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _unit(GLOBAL_ROWS, DIM, 20), _unit(GLOBAL_ROWS, DIM, 21)


def _worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        img_all, txt_all = _global_batch()
        scale = 2.0
        img = img_all[SPLIT[rank]].clone().requires_grad_()
        txt = txt_all[SPLIT[rank]].clone().requires_grad_()
        gi, gt = gather_features(img), gather_features(txt)
        torch.testing.assert_close(gi.detach(), img_all)
        torch.testing.assert_close(gt.detach(), txt_all)
        loss = mmcl_loss(gi, gt, torch.tensor(scale, dtype=torch.float64))

        # Single-process reference: the same loss on the concatenated batch, and its full gradient.
        ref_img, ref_txt = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
        ref = mmcl_loss(ref_img, ref_txt, torch.tensor(scale, dtype=torch.float64))
        ref.backward()
        torch.testing.assert_close(loss.detach(), ref.detach())

        loss.backward()
        # The local rows get exactly their share of the full gradient; other ranks' rows carry none, so the
        # sum over ranks of the local gradients rebuilds the full-batch gradient.
        torch.testing.assert_close(img.grad, ref_img.grad[SPLIT[rank]])
        torch.testing.assert_close(txt.grad, ref_txt.grad[SPLIT[rank]])
        grads = torch.autograd.grad(mmcl_loss(gather_features(img), gather_features(txt), 2.0), [img])
        full = torch.zeros_like(img_all)
        full[SPLIT[rank]] = grads[0]
        dist.all_reduce(full)
        torch.testing.assert_close(full, ref_img.grad)
    finally:
        dist.destroy_process_group()


def test_gather_features_two_process_gloo(tmp_path):
    # fork, not spawn: a spawned child re-imports torch and this module (~15 s on a busy 2-core machine); the
    # workers set one intra-op thread first, so no OpenMP pool inherited from the parent is used after the fork.
    mp.start_processes(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method="fork")
