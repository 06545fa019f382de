"""DECREE trigger inversion (detect.decree, detect.inversion) against hand computations, its files
(detect.proxy), the scan figure, and the scan command (detect.scan) on a backdoored vs a clean tiny model."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from cleansweep.data import EvalFolder
from cleansweep.detect import decree, inversion, proxy, scan
from cleansweep.errors import UserError
from cleansweep.evaluate import zeroshot_classifier
from cleansweep.models import create_model, file_sha256
from cleansweep.objective import ASR
from cleansweep.results.figures import plot_inversions

PATCH = 8  # the fixed 8 px BadNet corner patch of tests/test_search.py's tiny_checkpoint: PL1 64 / 1024 = 0.0625
SCAN = {"steps": 300, "lr": 0.5, "batch_size": 128}  # DECREE's 32 px settings; early stop ends it at ~60 steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the 2 shared cores two threads spin against other jobs (a step measured 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ fixtures
def _pretrain(world: dict, train_csv: str, out, keep_max_asr: bool) -> dict:
    from cleansweep import fit as session

    spec = {"model": {"name": "tiny-rn"}, "epochs": 6, "device": "cpu", "seed": 0,
            "attack": {"patch_size": PATCH, "location": "fixed", "patch": "fixed"},
            "data": {"train_csv": train_csv, "eval_dir": world["eval_dir"], "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    kept: dict = {}

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None and (not keep_max_asr or metrics[ASR] > kept.get(ASR, -1.0)):
            shutil.copytree(checkpoint_dir, out, dirs_exist_ok=True)
            kept.update(metrics)

    session.fit(spec, report)
    return kept


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A tiny-rn pre-trained on 512 synthetic pairs with 20% BadNet poisons (target banana), and its clean twin
    trained the same way on the unpoisoned pairs (~25 s each on 2 idle cores)."""
    from cleansweep.attacks.poison import poison_csv
    from cleansweep.data import make_demo_world

    out = tmp_path_factory.mktemp("twins")
    world = make_demo_world(out / "world", seed=0, n_train=512, n_clean=32, n_eval=36, image_size=32, num_classes=6)
    manifest = poison_csv(world["train_csv"], out / "poisoned", attack="badnet", target="banana", fraction=0.2,
                          seed=0, image_size=32, patch_size=PATCH, location="fixed", patch="fixed")
    bad = _pretrain(world, str(out / "poisoned" / manifest["output_csv"]), out / "bad", keep_max_asr=True)
    assert bad[ASR] >= 0.3, f"the tiny model did not take the backdoor (ASR {bad[ASR]}); recalibrate"
    _pretrain(world, world["train_csv"], out / "clean", keep_max_asr=False)
    return {"world": world, "bad": out / "bad" / "model.safetensors", "clean": out / "clean" / "model.safetensors",
            "bad_asr": bad[ASR]}


@pytest.fixture(scope="module")
def scanned(twins, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    result = scan.scan_checkpoint(twins["bad"], twins["world"]["eval_dir"], reference=twins["clean"], out_dir=out,
                                  device="cpu", seed=0, **SCAN)
    return {"result": result, "out": out}


@pytest.fixture(scope="module")
def untrained():
    return create_model("tiny-rn", seed=0)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ pure math
def test_mean_pairwise_cosine_matches_a_double_loop():
    feats = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = feats.numpy()
    pairs = [a[i] @ a[j] / np.linalg.norm(a[i]) / np.linalg.norm(a[j])
             for i, j in itertools.product(range(5), repeat=2) if i != j]
    assert float(inversion.mean_pairwise_cosine(feats)) == pytest.approx(np.mean(pairs), abs=1e-12)
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert float(inversion.mean_pairwise_cosine(same)) == pytest.approx(1.0, abs=1e-6)


def test_apply_trigger_and_pl1_by_hand():
    raw, mask, pattern = _images(2, 0, 3), torch.rand(1, 3, 3), torch.rand(3, 3, 3)
    out = inversion.apply_trigger(raw, mask, pattern).numpy()
    x, m, p = raw.numpy(), mask.numpy(), pattern.numpy()
    for b, c, i, j in itertools.product(range(2), range(3), range(3), range(3)):
        assert out[b, c, i, j] == pytest.approx((1 - m[0, i, j]) * x[b, c, i, j] + m[0, i, j] * p[c, i, j])
    assert inversion.pl1_norm(mask) == pytest.approx(m.sum() / 9)
    corner = torch.zeros(1, 32, 32)
    corner[:, -PATCH:, -PATCH:] = 1
    assert inversion.pl1_norm(corner) == 0.0625


def test_tanh_parametrisation_by_hand():
    a = torch.tensor([-3.0, -0.4, 0.0, 0.7, 20.0], dtype=torch.float64)
    by_hand = [min(max(math.tanh(v) / (2 - 1e-7) + 0.5, 0.0), 1.0) for v in a.tolist()]
    assert decree.to_unit(a).tolist() == pytest.approx(by_hand, abs=1e-15)
    u = torch.tensor([1e-6, 0.25, 0.5, 0.9], dtype=torch.float64)
    assert decree.from_unit(u).tolist() == pytest.approx([math.atanh((v - 0.5) * (2 - 1e-7)) for v in u.tolist()])
    assert decree.to_unit(decree.from_unit(u)).tolist() == pytest.approx(u.tolist(), abs=1e-12)


def test_lr_schedule_and_regimes_are_the_official_ones():
    lrs = [decree.decree_lr(e, 0.5, (30, 50)) for e in (0, 29, 30, 49, 50, 999)]
    assert lrs == [0.5, 0.5, 0.1, 0.1, 0.05, 0.05]
    assert [decree.decree_lr(e, 0.5, (200, 500)) for e in (199, 200, 499, 500)] == [0.5, 0.1, 0.1, 0.05]
    assert decree.regime_for(32) == decree.Regime((30, 50), 1e-5, 10)
    assert decree.regime_for(224) == decree.Regime((200, 500), 1e-7, 35)


def test_penalty_weight_follows_the_official_rule_by_hand():
    default = decree.PenaltyWeight()
    assert (default.value, default.minimum, default.factor, default.patience, default.reset_patience,
            default.cap) == (1e-3, 1e-5, 5.0, 5, 10, 1e5)
    w = decree.PenaltyWeight(1.0, minimum=0.3, factor=2.0, patience=2, reset_patience=2, cap=4.0)
    hit, miss = [True] * 3, [False] * 3
    flags = hit + hit + hit + miss + miss * 3 + miss + [True] * 5
    expected = ([1, 1, 2] + [2, 2, 4]  # up after 3 (> patience) reached steps
                + [4, 4, 4]  # at the cap: no longer multiplied
                + [4, 4, 2] + [2, 2, 1, 1, 1, 0.5, 0.5, 0.5, 0.25]  # down after 3 missed steps
                + [0.25] * 3  # below the minimum: no longer divided
                + [0.25, 0.25, 1, 1, 2])  # 3 (> reset_patience) reached steps below the minimum: reset to init
    assert [w.update(f) for f in flags] == expected


def test_early_stop_counts_steps_without_a_smaller_kept_mask():
    stop = decree.EarlyStop(patience=2)
    for kept in (None, None, 5.0, 5.0, 5.0):
        stop.update(kept)
    assert stop.count == 2 and not stop.stop(0.995, 0.99)
    stop.update(5.0)
    assert stop.count == 3 and stop.stop(0.995, 0.99) and not stop.stop(0.99, 0.99)
    stop.update(4.0)
    assert stop.count == 0 and stop.best == 4.0 and not stop.stop(0.995, 0.99)


class _LinearEncoder(torch.nn.Module):
    """encode_image = flattened image @ W: small enough to redo DECREE's loss by hand."""

    def __init__(self, size: int = 4, dim: int = 5) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * size * size, dim, generator=torch.Generator().manual_seed(7)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def test_one_step_is_decree_loss_and_adam_by_hand():
    """Two steps on 3 images of 4x4: step 0's similarity, the kept mask and step 1's mask against a hand computation
    of the loss -mean_{i != j} cos(f_i, f_j) + 1e-3 * sum over 3 channels of m, and of Adam's first step
    a - lr * g / (|g| + 1e-8) on the tanh parameters drawn from the seed."""
    model, images, norm = _LinearEncoder(), _images(3, 5, 4), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    inv = inversion.invert_trigger(model, images, norm, steps=2, batch_size=8, threshold=-1.0, lr=0.5, seed=11)
    gen = torch.Generator().manual_seed(11)
    u_mask = torch.rand((4, 4), generator=gen, dtype=torch.float64)
    u_pattern = torch.rand((3, 4, 4), generator=gen, dtype=torch.float64)
    a = torch.atanh((u_mask - 0.5) * (2 - 1e-7)).requires_grad_()
    b = torch.atanh((u_pattern - 0.5) * (2 - 1e-7)).requires_grad_()
    m, p = torch.tanh(a) / (2 - 1e-7) + 0.5, torch.tanh(b) / (2 - 1e-7) + 0.5
    x = (1 - m) * images.double() + m * p
    f = ((x - 0.5) / 0.25).flatten(1) @ model.w.detach().double()
    similarity = sum(f[i] @ f[j] / f[i].norm() / f[j].norm() for i, j in itertools.permutations(range(3), 2)) / 6
    loss = -similarity + 1e-3 * 3 * m.sum()
    ga, _ = torch.autograd.grad(loss, (a, b))
    m = m.detach()
    m1 = torch.tanh(a.detach() - 0.5 * ga / (ga.abs() + 1e-8)) / (2 - 1e-7) + 0.5
    assert inv.history["similarity"][0] == pytest.approx(float(similarity.detach()), abs=1e-5)
    assert inv.history["weight"][:2] == [1e-3, 1e-3] and inv.history["lr"] == [0.5, 0.5]
    assert inv.history["pl1_norm"] == pytest.approx([float(m.mean()), float(m1.mean())], abs=1e-6)
    kept = m if m.sum() <= m1.sum() else m1
    assert inv.pl1_norm == pytest.approx(float(kept.mean()), abs=1e-6)
    assert torch.allclose(inv.mask[0], kept.float(), atol=1e-6)


def test_search_wiring_lr_lambda_and_early_stop_replay_the_official_rules():
    """One step per epoch (batch > images): the lr follows the milestones, lambda replays `PenaltyWeight` on the
    reached flags, and the search stops where `EarlyStop` replayed on the kept L1 says (with lambda ~0 the
    similarity term grows the mask, so the first kept mask stays the smallest)."""
    model, images, norm = _LinearEncoder(), _images(3, 5, 4), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    regime = decree.Regime((2, 3), 1e-5, 2)
    inv = inversion.invert_trigger(model, images, norm, steps=30, batch_size=8, threshold=-1.0, init_weight=1e-12,
                                   seed=0, regime=regime)
    assert inv.stopped_early and inv.epochs == 4 and inv.step == 0
    assert inv.history["lr"] == [0.5, 0.5, 0.1, 0.05]
    weight, stop, kept, stopped_at = decree.PenaltyWeight(1e-12, minimum=1e-5), decree.EarlyStop(2), None, None
    for epoch, (sim, pl1) in enumerate(zip(inv.history["similarity"], inv.history["pl1_norm"], strict=True)):
        assert inv.history["weight"][epoch] == weight.value
        kept = min(kept, 3 * 16 * pl1) if kept is not None else 3 * 16 * pl1
        stop.update(kept)
        weight.update(sim > -1.0)
        if stop.stop(sim, -1.0):
            stopped_at = epoch + 1
            break
    assert stopped_at == inv.epochs


def test_no_step_reaching_the_target_reports_the_full_mask():
    model, images, norm = _LinearEncoder(), _images(4, 5, 4), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    inv = inversion.invert_trigger(model, images, norm, steps=3, batch_size=2, threshold=1.5, seed=0)
    assert not inv.reached and inv.pl1_norm == 1.0 and inv.step == 2 and not inv.stopped_early
    assert inv.epochs == 2 and len(inv.history["similarity"]) == 3  # 2 batches of 2 per epoch, 3 steps in all


# ------------------------------------------------------------------------------------------------ inversion
def test_inversion_in_range_deterministic_and_leaves_the_model_alone(untrained):
    model, images = untrained.model, _images(6, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    kwargs = {"steps": 4, "batch_size": 4, "lr": 0.2}
    a = inversion.invert_trigger(model, images, (untrained.mean, untrained.std), seed=3, **kwargs)
    b = inversion.invert_trigger(model, images, (untrained.mean, untrained.std), seed=3, **kwargs)
    c = inversion.invert_trigger(model, images, (untrained.mean, untrained.std), seed=4, **kwargs)
    assert a.mask.shape == (1, 32, 32) and a.pattern.shape == (3, 32, 32)
    for t in (a.mask, a.pattern):
        assert t.min() >= 0 and t.max() <= 1
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern) and a.history == b.history
    assert not torch.equal(a.mask, c.mask)
    assert len(a.history["similarity"]) == 4 and a.pl1_norm == pytest.approx(float(a.mask.mean()), rel=1e-6)
    assert a.reached and a.pl1_norm == pytest.approx(a.history["pl1_norm"][a.step], rel=1e-6)
    assert model.training, "the model's mode must be restored"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_inversion_rejects_bad_inputs(untrained):
    norm = (untrained.mean, untrained.std)
    for images, match in ((torch.rand(3, 32, 32), "shape"), (torch.rand(1, 3, 32, 32), "at least 2"),
                          (torch.rand(4, 3, 32, 32) * 255, r"\[0, 1\]")):
        with pytest.raises(UserError, match=match):
            inversion.invert_trigger(untrained.model, images, norm, steps=1)
    with pytest.raises(UserError, match="steps >= 1"):
        inversion.invert_trigger(untrained.model, _images(4, 0), norm, steps=0)
    with pytest.raises(UserError, match=r"\(1, H, W\)"):
        inversion.inverted_trigger(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        inversion.inverted_trigger(torch.full((1, 8, 8), 2.0), torch.rand(3, 8, 8))
    with pytest.raises(UserError, match="resolution"):
        inversion.inverted_trigger(torch.rand(1, 8, 8), torch.rand(3, 8, 8))(_images(2, 0), torch.Generator())


def test_save_and_load_inversion(tmp_path):
    mask, pattern = torch.rand(1, 8, 8), torch.rand(3, 8, 8)
    path = proxy.save_inversion(tmp_path / "inv.safetensors", mask, pattern, {"suspected_target": "banana"})
    got_mask, got_pattern, card = proxy.load_inversion(path)
    assert torch.equal(got_mask, mask) and torch.equal(got_pattern, pattern)
    assert card["suspected_target"] == "banana" and card["sha256"] == file_sha256(path)
    trigger, index = proxy.load_proxy(path, ["apple", "banana"])
    assert index == 1 and torch.equal(trigger(torch.zeros(1, 3, 8, 8), torch.Generator())[0], mask * pattern)
    with pytest.raises(UserError, match="not a class"):
        proxy.load_proxy(path, ["apple"])
    with pytest.raises(UserError, match="must end in .safetensors"):
        proxy.save_inversion(tmp_path / "inv.pt", mask, pattern, {})
    with pytest.raises(UserError, match="not found"):
        proxy.load_inversion(tmp_path / "missing.safetensors")
    safetensors.torch.save_file({"weight": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="expected tensors 'mask' and 'pattern'"):
        proxy.load_inversion(tmp_path / "other.safetensors")
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"mask": mask, "pattern": pattern}, pickled)  # a pickle under a safetensors name is never unpickled
    with pytest.raises(UserError, match="not a readable safetensors"):
        proxy.load_inversion(pickled)


def test_the_scan_figure_draws_mask_pattern_and_product_per_row():
    mask, pattern = np.random.default_rng(0).random((1, 4, 5)), np.random.default_rng(1).random((3, 4, 5))
    fig = plot_inversions([("model", mask, pattern), ("reference", 1 - mask, pattern)])
    axes = fig.get_axes()
    assert len(axes) == 6 and axes[0].get_title() == "model: mask" and axes[3].get_title() == "reference: mask"
    drawn = [np.asarray(ax.get_images()[0].get_array()) for ax in axes[:3]]
    assert np.array_equal(drawn[0], mask[0]) and drawn[1].shape == (4, 5, 3)
    assert np.allclose(drawn[1][2, 3], pattern[:, 2, 3])
    assert np.allclose(drawn[2][2, 3], mask[0, 2, 3] * pattern[:, 2, 3])
    assert np.array_equal(np.asarray(axes[3].get_images()[0].get_array()), 1 - mask[0])


# ------------------------------------------------------------------------------------------------ tiny twins
def test_backdoored_model_gets_the_smaller_mask_and_the_right_target(twins, scanned):
    """Measured with DECREE's 32 px settings (benchmarks/decree_pl1.py, seed 0): backdoored PL1 0.031 vs clean 0.076
    (ratio 0.40), suspected target banana with share 1.0; the paper's PL1 < 0.1 would flag both. Over 5 seeds the
    twin ratio is 0.34-0.96 (docs/fidelity.md, DECREE)."""
    result, out = scanned["result"], scanned["out"]
    bad, clean = result["model"], result["reference"]
    assert bad["pl1_norm"] < clean["pl1_norm"], (bad["pl1_norm"], clean["pl1_norm"])
    assert bad["suspected_target"] == "banana" and bad["target_index"] == 0
    assert bad["reached"] and bad["similarity"] > bad["clean_similarity"]
    assert result["verdict"]["backdoored"] and result["verdict"]["ratio"] < inversion.RATIO_THRESHOLD
    assert result["verdict"]["ratio"] == pytest.approx(bad["pl1_norm"] / clean["pl1_norm"])
    assert bad["sha256"] == file_sha256(twins["bad"]) and clean["sha256"] == file_sha256(twins["clean"])
    assert json.loads((out / "scan.json").read_text()) == json.loads(json.dumps(result))
    with Image.open(out / "inverted_trigger.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300  # two rows of three panels
    mask, _, card = proxy.load_inversion(out / "inversion.safetensors")
    assert card["suspected_target"] == "banana" and inversion.pl1_norm(mask) == pytest.approx(bad["pl1_norm"])


def test_proxy_asr_through_evaluate_matches_a_hand_computation(twins, scanned):
    bundle = scan.load_model(twins["bad"], device="cpu")
    mask, pattern, card = proxy.load_inversion(scanned["out"] / "inversion.safetensors")
    dataset = EvalFolder(twins["world"]["eval_dir"], bundle.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=10)
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, dataset.classnames, dataset.templates, "cpu")
    target = card["target_index"]
    got = inversion.proxy_asr(bundle.model, loader, classifier, inversion.inverted_trigger(mask, pattern),
                         normalize=(bundle.mean, bundle.std), target_index=target)
    raw = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    x = raw[labels != target]
    triggered = x * (1 - mask) + pattern * mask
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = F.normalize(bundle.model.encode_image((triggered - mean) / std), dim=-1)
    by_hand = float(((feats @ classifier).argmax(dim=1) == target).float().mean())
    assert got == pytest.approx(by_hand, abs=1e-9)
    assert got == pytest.approx(scanned["result"]["model"]["proxy_asr"], abs=1e-9)
    assert got == pytest.approx(scanned["result"]["model"]["target_share"], abs=1e-9)
