"""Zero-shot evaluation on constructed cases whose answers are computed by hand (numpy), and the checkpoint CLI path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleansweep.errors import UserError
from cleansweep.evaluate import evaluate, zeroshot_classifier
from cleansweep.models import create_model

MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class PixelModel(nn.Module):
    """A stand-in CLIP whose image features are the first `dim` pixels of row 0, channel 0 (after normalisation).

    With an identity classifier the class scores are those pixels, so every prediction is known by hand.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.bn = nn.BatchNorm1d(1)  # something whose behaviour depends on the mode
        self.modes: list[bool] = []

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.modes.append(self.training)
        return images[:, 0, 0, : self.dim]


def _batches(raw: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(raw[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def _world(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _hidden_switch_trigger(target: int):
    """Deterministic trigger: writes 1.0 into the target's pixel when the image's pixel (1, 0) exceeds 0.5."""

    def trigger(raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(generator, torch.Generator)
        assert raw.min() >= 0 and raw.max() <= 1, "trigger must see raw [0, 1] images, before normalisation"
        out = raw.clone()
        on = raw[:, 0, 1, 0] > 0.5
        out[on, 0, 0, target] = 1.0
        return out

    return trigger


def test_accuracy_and_asr_match_hand_computation():
    classes, target = 4, 2
    raw, labels = _world(23, classes, seed=0)
    model = PixelModel(classes)
    result = evaluate(model, _batches(raw, labels, 5), torch.eye(classes), normalize=MEAN_STD, target_index=target,
                      trigger=_hidden_switch_trigger(target), seed=0)

    scores = raw[:, 0, 0, :classes].numpy()
    lab = labels.numpy()
    expected_top1 = np.mean(scores.argmax(1) == lab)
    hits, counted, hits_with_target_images = 0, 0, 0
    for i in range(len(lab)):
        row = scores[i].copy()
        if raw[i, 0, 1, 0] > 0.5:
            row[target] = 1.0
        hits_with_target_images += int(row.argmax() == target)
        if lab[i] != target:
            counted += 1
            hits += int(row.argmax() == target)
    assert result["num_images"] == 23
    assert result["zeroshot_top1"] == pytest.approx(expected_top1)
    assert result["num_asr_images"] == counted == int((lab != target).sum())
    assert result["asr_top1"] == pytest.approx(hits / counted)
    # Including target-class images would change the answer in this world: the exclusion is really tested.
    assert hits_with_target_images / len(lab) != pytest.approx(hits / counted)


def test_topk_on_many_and_few_classes():
    for classes in (7, 3):
        raw, labels = _world(30, classes, seed=classes)
        result = evaluate(PixelModel(classes), _batches(raw, labels, 8), torch.eye(classes), normalize=MEAN_STD,
                          target_index=0)
        ranks = np.argsort(-raw[:, 0, 0, :classes].numpy(), axis=1)
        k = min(5, classes)
        expected = np.mean([labels[i].item() in ranks[i, :k] for i in range(30)])
        assert result["zeroshot_top5"] == pytest.approx(expected)
        if classes == 3:
            assert result["zeroshot_top5"] == 1.0
        assert np.isnan(result["asr_top1"]) and result["num_asr_images"] == 0


def test_callable_normalize_and_max_images():
    raw, labels = _world(20, 4, seed=3)
    seen = []

    def normalize(x):
        seen.append(len(x))
        return x * 2 - 1

    result = evaluate(PixelModel(4), _batches(raw, labels, 6), torch.eye(4), normalize=normalize, target_index=1,
                      max_images=13)
    assert result["num_images"] == 13 and seen == [6, 6, 1]
    expected = np.mean(raw[:13, 0, 0, :4].numpy().argmax(1) == labels[:13].numpy())
    assert result["zeroshot_top1"] == pytest.approx(expected)


def test_seeded_random_trigger_repeats_per_evaluation():
    raw, labels = _world(40, 4, seed=4)
    calls: list[torch.Tensor] = []

    def random_trigger(x, generator):
        out = x.clone()
        out[:, 0, 0, 0] = torch.rand(len(x), generator=generator)
        calls.append(out)
        return out

    def run(seed):
        calls.clear()
        metrics = evaluate(PixelModel(4), _batches(raw, labels, 16), torch.eye(4), normalize=MEAN_STD,
                           target_index=0, trigger=random_trigger, seed=seed)
        return metrics, torch.cat(calls)

    first, images_a = run(0)
    second, images_b = run(0)
    other, images_c = run(1)
    assert first == second and torch.equal(images_a, images_b)
    assert not torch.equal(images_a, images_c)
    assert len(images_a) == first["num_asr_images"] == int((labels != 0).sum())


@pytest.mark.parametrize("start_training", [True, False])
def test_mode_is_restored_and_eval_used(start_training):
    model = PixelModel(4).train(start_training)
    raw, labels = _world(8, 4, seed=5)
    evaluate(model, _batches(raw, labels, 4), torch.eye(4), normalize=MEAN_STD, target_index=0,
             trigger=_hidden_switch_trigger(0))
    assert model.training is start_training
    assert model.modes and not any(model.modes)


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny-rn", seed=0)


def test_zeroshot_classifier_is_mean_of_normalised_templates(tiny):
    classnames = ["cat", "dog", "banana"]
    templates = ["a photo of a {}.", "a blurry {}", "{}"]
    tiny.model.train()
    weights = zeroshot_classifier(tiny.model, tiny.tokenizer, classnames, templates, "cpu")
    assert tiny.model.training
    assert weights.shape == (64, 3)
    tiny.model.eval()
    columns = []
    with torch.no_grad():
        for name in classnames:
            embs = [F.normalize(tiny.model.encode_text(tiny.tokenizer([t.format(name)])), dim=-1)[0]
                    for t in templates]
            mean = torch.stack(embs).mean(0)
            columns.append(mean / mean.norm())
    tiny.model.train()
    torch.testing.assert_close(weights, torch.stack(columns, dim=1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ evaluate_checkpoint
def _eval_folder(root, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("apple", "banana", "cherry"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "templates.json").write_text(json.dumps(["a photo of a {}.", "{}"]))
    return root


def test_evaluate_checkpoint_end_to_end(tmp_path, tiny):
    from cleansweep.evaluate import evaluate_checkpoint
    from cleansweep.models import save_checkpoint

    root = _eval_folder(tmp_path / "eval")
    ckpt = save_checkpoint(tmp_path / "m.safetensors", tiny.model, {"step": 1})
    kwargs = dict(attack="badnet", target="banana", patch_size=4, subset=None, batch_size=5, seed=0, device="cpu")
    result = evaluate_checkpoint(ckpt, root, **kwargs)
    assert result["model"] == "tiny-rn" and result["num_images"] == 12 and result["num_asr_images"] == 8
    assert 0 <= result["zeroshot_top1"] <= result["zeroshot_top5"] <= 1 and 0 <= result["asr_top1"] <= 1

    # Independent top-1: PIL -> the model's own preprocess -> features -> classifier, image by image.
    from PIL import Image

    classifier = zeroshot_classifier(tiny.model, tiny.tokenizer, ["apple", "banana", "cherry"],
                                     ["a photo of a {}.", "{}"], "cpu")
    tiny.model.eval()
    correct = 0
    with torch.no_grad():
        for label, name in enumerate(("apple", "banana", "cherry")):
            for path in sorted((root / name).iterdir()):
                x = tiny.preprocess_val(Image.open(path))[None]
                correct += int((F.normalize(tiny.model.encode_image(x), dim=-1) @ classifier).argmax() == label)
    assert result["zeroshot_top1"] == pytest.approx(correct / 12)

    (tmp_path / "m.json").unlink()  # no card: the model is inferred from the weights' shapes
    inferred = evaluate_checkpoint(ckpt, root, **{**kwargs, "subset": 2})
    assert inferred["model"] == "tiny-rn" and inferred["num_images"] == 2
    with pytest.raises(UserError, match="does not fit model 'tiny-vit'"):
        evaluate_checkpoint(ckpt, root, model_name="tiny-vit", **kwargs)
    with pytest.raises(UserError, match="'durian'"):
        evaluate_checkpoint(ckpt, root, **{**kwargs, "target": "durian"})


# ------------------------------------------------------------------------------------ the trigger of a checkpoint
def _asr_with(model_bundle, root, trigger, seed=0):
    from cleansweep.data import EvalFolder

    folder = EvalFolder(root, model_bundle.image_size)
    loader = torch.utils.data.DataLoader(folder, batch_size=5)
    classifier = zeroshot_classifier(model_bundle.model, model_bundle.tokenizer, folder.classnames, folder.templates,
                                     "cpu")
    return evaluate(model_bundle.model, loader, classifier, normalize=(model_bundle.mean, model_bundle.std),
                    target_index=folder.class_index("banana"), trigger=trigger, seed=seed)["asr_top1"]


def test_evaluate_takes_the_trigger_the_checkpoint_was_poisoned_with(tmp_path, tiny, capsys):
    # The demo's bug: `cleansweep evaluate` measured ASR with the default BadNet (random place, fresh values) while
    # the model was poisoned with a fixed 8 px patch in a fixed corner and its own trigger seed.
    from cleansweep import cli
    from cleansweep.attacks.poison import create_trigger
    from cleansweep.models import save_checkpoint

    root = _eval_folder(tmp_path / "eval", per_class=6)
    poisoned = {"name": "badnet", "target": "banana", "patch_size": 8, "location": "fixed", "patch": "fixed",
                "trigger_seed": 3}
    ckpt = save_checkpoint(tmp_path / "m.safetensors", tiny.model, {"config": {"train": {"attack": poisoned}}})
    assert cli.main(["evaluate", str(ckpt), "--eval-data", str(root), "--batch-size", "5", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attack_source"] == "card"
    assert {k: out["trigger"][k] for k in ("patch_size", "location", "patch", "trigger_seed")} == {
        "patch_size": 8, "location": "fixed", "patch": "fixed", "trigger_seed": 3}
    own = create_trigger("badnet", 32, patch_size=8, location="fixed", patch="fixed", trigger_seed=3)
    assert out["asr_top1"] == pytest.approx(_asr_with(tiny, root, own))

    # The poison manifest gives the same trigger; a manifest that disagrees with the card is refused.
    manifest = {"attack": "badnet", "target": "banana", "trigger_params": {k: v for k, v in poisoned.items()
                                                                          if k not in ("name", "target")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    argv = ["evaluate", str(ckpt), "--eval-data", str(root), "--device", "cpu",
            "--poison-manifest", str(tmp_path / "manifest.json")]
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out)["attack_source"] == "manifest"
    (tmp_path / "other.json").write_text(json.dumps({**manifest, "trigger_params": {"trigger_seed": 4}}))
    assert cli.main(argv[:-1] + [str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "card records trigger" in err and "\n" not in err and "weights_only" not in err

    # An explicit flag overrides one setting; a checkpoint that records no trigger needs --attack.
    assert cli.main([*argv[:4], "--device", "cpu", "--trigger-seed", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trigger"]["trigger_seed"] == 5 and out["attack_source"] == "card+flags"
    bare = save_checkpoint(tmp_path / "bare.safetensors", tiny.model, {})
    assert cli.main(["evaluate", str(bare), "--eval-data", str(root), "--device", "cpu"]) == 2
    assert "no trigger recorded" in capsys.readouterr().err
