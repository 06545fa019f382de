"""Methods: contract tests over the registry (each method's example values come from a shipped search space), then
each method's math against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_examples import shipped_example
from torch.utils.data import DataLoader, Dataset

from cleansweep.errors import UserError
from cleansweep.methods import DEFAULT_METHOD, METHODS, create_task, list_methods, method_spec, spec_class
from cleansweep.methods.base import BaseMethodSpec, ContrastiveWeights
from cleansweep.methods.contrastive import ContrastiveSpec
from cleansweep.methods.deep_cluster import DeepCluster
from cleansweep.models import create_model
from cleansweep.train_config import TrainSpec

SPECS = {
    "contrastive": {"ssl_weight": 1.0},
    "deep_cluster": {"cluster_weight": 2.0, "num_clusters": 3, "cluster_iters": 5},
    "l2_init": {"l2_init_weight": 0.5},
    "perturb_recover": {"ssl_weight": 1.0, "par_weight": 0.5, "par_cap": 0.3},
    "shrink_perturb": {"shrink": 0.8, "perturb": 0.1},
}


class RowsDataset(Dataset):
    """Training dicts of random images and captions, one per row (what ImageCaptionDataset yields)."""

    def __init__(self, n: int, tokenizer, seed: int = 0, ssl: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.aug = torch.randn(n, 3, 32, 32, generator=g)
        words = ["red", "blue", "green", "circle", "square", "star"]
        self.text = tokenizer([f"a {words[i % 3]} {words[3 + i % 3]}" for i in range(n)])
        self.text_aug = tokenizer([f"{words[3 + i % 3]} {words[i % 3]}" for i in range(n)])
        self.ssl = ssl

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[i], "text": self.text[i], "index": torch.tensor(i)}
        if self.ssl:
            item |= {"image_aug": self.aug[i], "text_aug": self.text_aug[i]}
        return item


@pytest.fixture(scope="module")
def bundle():
    return create_model("tiny-rn", seed=0)


def _model():
    return create_model("tiny-rn", seed=0).model


def _batch(tokenizer, n: int = 6, ssl: bool = True) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(RowsDataset(n, tokenizer, ssl=ssl), batch_size=n)))


def _task(name: str, **overrides):
    spec = method_spec({"name": name, **SPECS[name], **overrides})
    return create_task(spec, _model())


@pytest.mark.parametrize("name", list_methods())
def test_contract(name: str, bundle) -> None:
    spec = shipped_example(name)
    task = create_task(spec, _model())
    ds = RowsDataset(8, bundle.tokenizer, ssl=task.needs_ssl_views)
    task.prepare(torch.Generator().manual_seed(0))
    task.on_epoch_start(0, DataLoader(ds, batch_size=4), torch.device("cpu"))
    out = task(next(iter(DataLoader(ds, batch_size=8))))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    parts = {k for k in out if k != "loss"}
    # A field `<part>_weight` weights the loss part `<part>_loss`: every weighted part is reported, nothing else.
    weighted = {f.removesuffix("_weight") + "_loss" for f, v in spec.model_dump().items() if f.endswith("_weight")}
    assert {f.removesuffix("_weight") + "_loss" for f, v in spec.model_dump().items()
            if f.endswith("_weight") and v > 0} <= parts <= weighted
    assert all(not out[k].requires_grad for k in parts)
    out["loss"].backward()
    grads = [p.grad for p in task.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    assert isinstance(task.fresh_parameters(), list)
    assert METHODS[name][1]  # every entry has a description


@pytest.mark.parametrize("name", list_methods())
def test_spec_contract(name: str) -> None:
    cls = spec_class(name)
    assert issubclass(cls, BaseMethodSpec) and cls().name == name == METHODS[name][0].spec_class().name
    assert all(field.description for key, field in cls.model_fields.items() if key != "name")  # documented
    example = shipped_example(name)
    # Round trips: Python, JSON, and through TrainSpec (what a trial and the effective params see).
    assert method_spec(example.model_dump()) == example
    assert method_spec(__import__("json").loads(example.model_dump_json())) == example
    train = TrainSpec.model_validate({"data": {"train_csv": "c.csv", "eval_dir": "e"},
                                      "method": example.model_dump(mode="json")})
    assert train.method == example and type(train.method) is cls
    assert isinstance(example.changes_start_weights(), bool) and example.for_rows(10**6) == example
    assert cls.model_config["frozen"] and cls.model_config["extra"] == "forbid"
    assert not cls.model_config["allow_inf_nan"]


@pytest.mark.parametrize("name", list_methods())
def test_a_field_of_another_method_is_refused(name: str) -> None:
    own = set(spec_class(name).model_fields)
    foreign = sorted({(f, m) for m in METHODS for f in spec_class(m).model_fields if f not in own})
    assert foreign or len(METHODS) == 1
    for field, owner in foreign:
        with pytest.raises(UserError) as err:
            method_spec({"name": name, field: 1})
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"method: {field}: not a field of method {name!r}") and owner in msg


def test_default_method_and_its_defaults() -> None:
    spec = TrainSpec.model_validate({"data": {"train_csv": "c.csv", "eval_dir": "e"}})
    assert DEFAULT_METHOD == "contrastive" and spec.method == ContrastiveSpec()
    assert spec.method.model_dump() == {"name": "contrastive", "mmcl_weight": 1.0, "ssl_weight": 0.0}
    assert method_spec({"ssl_weight": 2}) == ContrastiveSpec(ssl_weight=2)  # no name: the default method


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(UserError, match=r"^method: unknown method 'cleanclipp'; choose from: contrastive, deep_clus"):
        method_spec({"name": "cleanclipp"})
    spec = ContrastiveSpec.model_construct(name="cleanclipp")
    with pytest.raises(UserError, match=r"unknown method 'cleanclipp'; choose from: contrastive, deep_cluster"):
        create_task(spec, _model())


def test_method_errors_name_the_field_without_the_union_tag() -> None:
    with pytest.raises(UserError, match=r"^method.ssl_weight: Input should be greater than or equal to 0$"):
        method_spec({"name": "perturb_recover", "ssl_weight": -1})
    with pytest.raises(UserError, match=r"^method.par_cap: Input should be less than or equal to 2$"):
        method_spec({"name": "perturb_recover", "par_cap": 3})
    with pytest.raises(UserError, match=r"^method.shrink: Input should be a finite number$"):
        method_spec({"name": "shrink_perturb", "shrink": float("inf")})
    with pytest.raises(UserError, match=r"^method: all loss weights are 0; set mmcl_weight or ssl_weight > 0$"):
        method_spec({"mmcl_weight": 0})
    with pytest.raises(UserError, match=r"set mmcl_weight, ssl_weight or cluster_weight > 0"):
        method_spec({"name": "deep_cluster", "mmcl_weight": 0})
    assert isinstance(method_spec({"name": "deep_cluster", "mmcl_weight": 0, "cluster_weight": 1}), ContrastiveWeights)


def test_only_a_perturbing_setting_changes_the_start_weights() -> None:
    assert not method_spec({"name": "shrink_perturb"}).changes_start_weights()
    assert method_spec({"name": "shrink_perturb", "shrink": 0.9}).changes_start_weights()
    assert method_spec({"name": "shrink_perturb", "perturb": 1e-3}).changes_start_weights()
    others = [m for m in list_methods() if not spec_class(m).perturbs_start]
    assert others and not any(spec_class(m)().changes_start_weights() for m in others)


def test_deep_cluster_caps_k_at_the_rows() -> None:
    spec = method_spec({"name": "deep_cluster", "num_clusters": 100})
    with pytest.warns(UserWarning, match="num_clusters 100 > 64 rows"):
        assert spec.for_rows(64).num_clusters == 64
    assert spec.for_rows(100) is spec


def _hand_contrastive(model, batch, w_mmcl: float, w_ssl: float) -> tuple[float, float, float]:
    """Independent formulas: CLIP's symmetric InfoNCE and CleanCLIP's mean of image/text in-modal InfoNCE."""
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.cat([batch["image"], batch["image_aug"]])), dim=-1)
        tfeats = F.normalize(model.encode_text(torch.cat([batch["text"], batch["text_aug"]])), dim=-1)
    n = batch["image"].shape[0]
    scale = math.exp(model.logit_scale.item())
    labels = torch.arange(n)

    def ce(a, b):
        return F.cross_entropy(scale * a @ b.T, labels).item()

    mmcl = (ce(feats[:n], tfeats[:n]) + ce(tfeats[:n], feats[:n])) / 2
    ssl = (ce(feats[:n], feats[n:]) + ce(tfeats[:n], tfeats[n:])) / 2
    return mmcl, ssl, w_mmcl * mmcl + w_ssl * ssl


def test_contrastive_matches_hand_formula(bundle) -> None:
    task = create_task(ContrastiveSpec(mmcl_weight=0.7, ssl_weight=2.0), _model())
    batch = _batch(bundle.tokenizer)
    out = task(batch)
    # One forward over cat([orig, aug]) in train mode (BN batch statistics of both views); compare the same.
    task.model.train()
    mmcl, ssl, total = _hand_contrastive(task.model, batch, 0.7, 2.0)
    assert out["mmcl_loss"].item() == pytest.approx(mmcl, rel=1e-4)
    assert out["ssl_loss"].item() == pytest.approx(ssl, rel=1e-4)
    assert out["loss"].item() == pytest.approx(total, rel=1e-4)


def test_contrastive_views_only_when_ssl_weighted(bundle) -> None:
    mmcl_only = create_task(ContrastiveSpec(mmcl_weight=1, ssl_weight=0), _model())
    ssl_only = create_task(ContrastiveSpec(mmcl_weight=0, ssl_weight=1), _model())
    assert not mmcl_only.needs_ssl_views and ssl_only.needs_ssl_views
    assert set(mmcl_only(_batch(bundle.tokenizer, ssl=False))) == {"loss", "mmcl_loss"}
    out = ssl_only(_batch(bundle.tokenizer))
    assert set(out) == {"loss", "ssl_loss"} and out["loss"].item() == pytest.approx(out["ssl_loss"].item())


def test_shrink_only_halves_every_parameter() -> None:
    task = _task("shrink_perturb", shrink=0.5, perturb=0.0)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    task.prepare(torch.Generator().manual_seed(0))
    params = dict(task.model.named_parameters())
    for key, value in task.model.state_dict().items():
        expected = before[key] * 0.5 if key in params else before[key]  # BN running stats are not weights
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_perturb_gaussian_is_shrink_plus_sigma_noise() -> None:
    task = _task("shrink_perturb", shrink=0.9, perturb=0.01, perturb_kind="gaussian")
    before = [p.detach().clone() for p in task.model.parameters()]
    task.prepare(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(p.shape, generator=g) for p in before]
    for p, p0, z in zip(task.model.parameters(), before, noise, strict=True):
        torch.testing.assert_close(p.detach(), 0.9 * p0 + 0.01 * z)


def test_perturb_init_uses_a_fresh_initialisation() -> None:
    task = _task("shrink_perturb", shrink=0.5, perturb=0.2)
    before = [p.detach().clone() for p in task.model.parameters()]
    task.prepare(torch.Generator().manual_seed(1))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(1)))
    fresh = create_model("tiny-rn", seed=seed).model
    for p, p0, q in zip(task.model.parameters(), before, fresh.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), 0.5 * p0 + 0.2 * q.detach())
    assert fresh.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert not torch.equal(fresh.token_embedding.weight, _model().token_embedding.weight)


def test_l2_init_zero_at_start_positive_after_a_step(bundle) -> None:
    task = _task("l2_init", l2_init_weight=1.0)
    task.prepare(torch.Generator().manual_seed(0))
    batch = _batch(bundle.tokenizer, ssl=False)
    out = task(batch)
    assert out["l2_init_loss"].item() == 0.0
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    out["loss"].backward()
    opt.step()
    anchors = [a.clone() for a in task._anchors]
    hand = sum(((p.detach() - a) ** 2).sum().item() for p, a in zip(task.model.parameters(), anchors, strict=True))
    after = task(batch)
    assert hand > 0
    assert after["l2_init_loss"].item() == pytest.approx(hand, rel=1e-5)
    assert after["loss"].item() == pytest.approx(after["mmcl_loss"].item() + hand, rel=1e-5)
    # The anchors travel with the task's state (resume without prepare).
    restored = _task("l2_init", l2_init_weight=1.0)
    restored.load_state_dict(task.state_dict())
    assert restored(batch)["l2_init_loss"].item() == pytest.approx(hand, rel=1e-5)


def test_l2_init_without_prepare_is_an_error(bundle) -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        _task("l2_init")(_batch(bundle.tokenizer, ssl=False))


def test_deep_cluster_pseudo_labels_and_loss(bundle) -> None:
    task = _task("deep_cluster", num_clusters=4)
    assert isinstance(task, DeepCluster)
    ds = RowsDataset(12, bundle.tokenizer)
    task.on_epoch_start(0, DataLoader(ds, batch_size=5), torch.device("cpu"))
    labels = task.pseudo_labels
    assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 4
    assert len(labels.unique()) > 1
    assert task.head.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert torch.count_nonzero(task.head.bias) == 0
    batch = next(iter(DataLoader(ds, batch_size=6)))
    out = task(batch)
    with torch.no_grad():
        task.model.train()
        feats = F.normalize(task.model.encode_image(batch["image"]), dim=-1)
        hand = F.cross_entropy(task.head(feats), labels[batch["index"]]).item()
    assert out["cluster_loss"].item() == pytest.approx(hand, rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["mmcl_loss"].item() + 2.0 * hand, rel=1e-4)
    # Same embeddings and seed -> same clusters; the pseudo-labels travel with the task's state.
    restored = _task("deep_cluster", num_clusters=4)
    restored.load_state_dict(task.state_dict())
    torch.testing.assert_close(restored.pseudo_labels, labels)


def test_deep_cluster_head_is_fresh_each_epoch(bundle) -> None:
    task = _task("deep_cluster", num_clusters=3)
    loader = DataLoader(RowsDataset(9, bundle.tokenizer), batch_size=9)
    task.on_epoch_start(0, loader, torch.device("cpu"))
    first = task.head.weight.detach().clone()
    task.on_epoch_start(1, loader, torch.device("cpu"))
    assert not torch.equal(first, task.head.weight)
    assert task.fresh_parameters() == list(task.head.parameters())


# ------------------------------------------------------------------------------ perturb and recover
def _par_task(**overrides):
    task = _task("perturb_recover", **overrides)
    task.train()
    return task


def test_perturb_recover_frozen_copy_is_never_trained(bundle) -> None:
    from cleansweep.optim import create_optimizer

    task = _par_task()
    task.prepare(torch.Generator().manual_seed(0))
    frozen = task.frozen
    frozen_ids = {id(p) for p in frozen.parameters()}
    assert frozen_ids and not frozen_ids & {id(p) for p in task.parameters()}
    assert not any(p.requires_grad for p in frozen.parameters())
    assert [k for k in task.state_dict() if not k.startswith("model.")] == ["_extra_state"]
    optimizer = create_optimizer(task, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    assert not frozen_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    model_before = task.model.visual.conv1.weight.detach().clone()
    batch = _batch(bundle.tokenizer)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        task(batch)["loss"].backward()
        optimizer.step()
    assert not torch.equal(model_before, task.model.visual.conv1.weight)
    for key, value in frozen.state_dict().items():  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for p in frozen.parameters())


def test_perturb_recover_without_prepare_is_an_error(bundle) -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        _par_task()(_batch(bundle.tokenizer))


def test_perturb_recover_resume_restores_the_frozen_model(tiny_spec: dict, tmp_path) -> None:
    import shutil

    from cleansweep import fit as session
    from cleansweep.config import deep_update
    from cleansweep.models import load_state_dict_file

    spec = deep_update(tiny_spec, {"method": {"name": "perturb_recover", "par_weight": 1.0, "par_cap": 2.0},
                                   "eval_every": 0.5})
    full: dict[int, dict] = {}

    def keep(metrics: dict, checkpoint_dir: str | None) -> None:
        full[metrics["step"]] = metrics
        shutil.copytree(checkpoint_dir, tmp_path / f"step{metrics['step']}")

    session.fit(spec, keep)
    assert sorted(full) == [0, 2, 4] and full[4]["par_loss"] > 0
    # The checkpoint holds the model as it was at prepare time: fit's seeded start, not the step-2 weights.
    saved = torch.load(tmp_path / "step2" / session.STATE_FILE, weights_only=True)["task"]["_extra_state"]
    start = create_model("tiny-rn", seed=0).model.eval()
    restored = create_task(method_spec(spec["method"]), create_model("tiny-rn", seed=1).model)
    restored.load_state_dict({"_extra_state": saved}, strict=False)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(restored.frozen.eval().encode_image(images), start.encode_image(images),
                                   rtol=0, atol=0)
    resumed: dict[int, dict] = {}

    def keep_resumed(metrics: dict, checkpoint_dir: str | None) -> None:
        resumed[metrics["step"]] = metrics
        shutil.copytree(checkpoint_dir, tmp_path / "resumed")

    session.fit(spec, keep_resumed, resume_from=tmp_path / "step2")
    assert sorted(resumed) == [4]
    # Steps 3-4 pushed away from the same f0 as the uninterrupted run did (an f0 rebuilt at resume would not).
    for key in ("loss", "par_loss", "mmcl_loss", "zeroshot_top1", "asr_top1"):
        assert resumed[4][key] == full[4][key], key
    a = load_state_dict_file(tmp_path / "step4" / session.MODEL_FILE)
    b = load_state_dict_file(tmp_path / "resumed" / session.MODEL_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
