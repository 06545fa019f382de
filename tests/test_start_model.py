"""The sweep's starting model follows the one trigger rule of `cleansweep evaluate`: the trigger its card (or the poison
manifest the file names) records, the fields the file writes on top, a contradiction refused before anything runs
unless `attack.override: true`; the model name of its card; a loud warning when the start already looks clean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_PATCH

from cleansweep import cli
from cleansweep.errors import UserError
from cleansweep.sweep import space as spaces
from cleansweep.sweep import start as start_model

ASR = "asr_top1"
POISONED = {"name": "badnet", "target": "banana", "patch_size": 8, "location": "fixed", "patch": "fixed",
            "trigger_seed": 3}


def _space(tmp_path: Path, checkpoint: Path, world: dict[str, Any], attack: dict[str, Any] | None = None,
           **top: Any) -> Path:
    values = {"model": {"checkpoint": str(checkpoint)},
              "data": {"train_csv": str(world["clean_csv"]), "eval_dir": str(world["eval_dir"]), "batch_size": 16,
                       "eval_batch_size": 64},
              "epochs": 1, "space": {"optim.lr": {"choice": [1e-3]}}, "search": {"num_samples": 1}, **top}
    if attack is not None:
        values["attack"] = attack
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _resolve(path: Path, workdir: Path) -> start_model.StartModel:
    return start_model.resolve(spaces.load(path), workdir, echo=lambda line: None)


@pytest.fixture
def recorded(tmp_path):
    """An untrained tiny-rn checkpoint whose card records the fixed-patch trigger `POISONED`."""
    from cleansweep.models import create_model, save_checkpoint

    return save_checkpoint(tmp_path / "m.safetensors", create_model("tiny-rn", seed=0).model,
                           {"attack": POISONED})


def _asr(checkpoint: Path, eval_dir: str, trigger) -> float:
    # Independent of the sweep's code path: the model, the folder and `evaluate` with a hand-built trigger.
    from cleansweep.data import EvalFolder
    from cleansweep.evaluate import evaluate, zeroshot_classifier
    from cleansweep.models import load_checkpoint_model

    bundle = load_checkpoint_model(checkpoint)
    folder = EvalFolder(eval_dir, bundle.image_size)
    loader = torch.utils.data.DataLoader(folder, batch_size=64)
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, folder.classnames, folder.templates, "cpu")
    return evaluate(bundle.model, loader, classifier, normalize=(bundle.mean, bundle.std),
                    target_index=folder.class_index("banana"), trigger=trigger, seed=0)[ASR]


def test_a_checkpoint_sweep_starts_with_the_trigger_its_card_records(tmp_path, tiny_checkpoint):
    # The bug: with no `attack:` in the file the sweep measured a fresh random BadNet patch (the YAML's defaults), so
    # a model the fixed 8 px patch controls started at ASR ~0 and every trial looked clean.
    from cleansweep.attacks.registry import create_trigger

    ckpt, world = tiny_checkpoint["checkpoint"], tiny_checkpoint["world"]
    start = _resolve(_space(tmp_path, ckpt, world), tmp_path / "w")
    assert start.attack_source == "card" and start.model_name == "tiny-rn"
    assert {k: start.base["attack"][k] for k in ("patch_size", "location", "patch")} == {
        "patch_size": TINY_PATCH, "location": "fixed", "patch": "fixed"}
    own = create_trigger("badnet", 32, patch_size=TINY_PATCH, location="fixed", patch="fixed", trigger_seed=0)
    fresh = create_trigger("badnet", 32)  # the file's defaults: a small random patch, fresh values per image
    expected, random_patch = _asr(ckpt, world["eval_dir"], own), _asr(ckpt, world["eval_dir"], fresh)
    assert start.metrics[ASR] == pytest.approx(expected, abs=1e-9)
    assert expected >= 0.3 and abs(expected - random_patch) >= 0.2, (expected, random_patch)
    assert start.warning is None  # ASR far above the 0.05 threshold


@pytest.mark.parametrize(("attack", "said"), [
    ({"patch_size": 4}, "patch_size=4 (recorded: 8)"),
    ({"name": "blended"}, "name='blended' (recorded: 'badnet')"),
    ({"target": "moon"}, "target='moon' (recorded: 'banana')"),
    ({"trigger_seed": 0, "patch": "fixed"}, "trigger_seed=0 (recorded: 3)"),
])
def test_a_yaml_attack_that_contradicts_the_card_is_refused_before_anything_starts(tmp_path, tiny_world, recorded,
                                                                                   capsys, monkeypatch, attack, said):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "w"
    assert cli.main(["search", str(_space(tmp_path, recorded, tiny_world, attack)), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and said in err and "attack.override: true" in err and "\n" not in err
    assert not work.exists() and not ray.is_initialized()  # nothing written, no cluster


def test_written_fields_that_agree_or_override_true_are_taken_on_top_of_the_card(tmp_path, tiny_world, recorded):
    # Writing the recorded values, or the evaluation seed (not part of the trigger), is no contradiction.
    same = _resolve(_space(tmp_path, recorded, tiny_world, {"patch_size": 8, "seed": 5}), tmp_path / "w")
    assert same.base["attack"] == {**POISONED, "params": {}, "seed": 5} and same.attack_source == "card+file"
    # `override: true` says it explicitly: one field changes, the rest stays the card's.
    over = _resolve(_space(tmp_path, recorded, tiny_world, {"patch_size": 4, "override": True}), tmp_path / "w")
    assert over.base["attack"] == {**POISONED, "patch_size": 4, "params": {}, "seed": 0}
    assert "override" not in over.base["attack"] and "manifest" not in over.base["attack"]


def test_the_manifest_the_file_names_gives_the_trigger(tmp_path, tiny_world):
    from cleansweep.models import create_model, save_checkpoint

    bare = save_checkpoint(tmp_path / "bare.safetensors", create_model("tiny-rn", seed=0).model, {})
    (tmp_path / "bare.json").unlink()  # no card at all: the model from the weights' shapes, the trigger from nowhere
    with pytest.raises(UserError, match="no trigger recorded.*attack.manifest"):
        _resolve(_space(tmp_path, bare, tiny_world), tmp_path / "w")
    manifest = {"attack": "badnet", "target": "banana",
                "trigger_params": {k: v for k, v in POISONED.items() if k not in ("name", "target")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    start = _resolve(_space(tmp_path, bare, tiny_world, {"manifest": str(tmp_path / "manifest.json")}),
                     tmp_path / "w")
    assert start.attack_source == "manifest" and start.model_name == "tiny-rn"
    assert {k: start.base["attack"][k] for k in POISONED} == POISONED


def test_a_start_already_under_the_threshold_is_a_loud_warning_naming_the_trigger(tmp_path, tiny_world, recorded,
                                                                                  capsys):
    from cleansweep.sweep import driver

    space = _space(tmp_path, recorded, tiny_world, objective={"threshold": 1.0})
    start = _resolve(space, tmp_path / "w")
    line = start.warning  # `search` prints it once nothing can refuse the sweep (a refusal stays one line)
    assert line.startswith("WARNING") and "WARNING" not in capsys.readouterr().err
    assert f"asr_top1 {start.metrics[ASR]:.3f} <= threshold 1" in line
    assert "patch_size=8" in line and "trigger_seed=3" in line and "(from the card)" in line
    params = driver._sweep_params(spaces.load(space), start)  # what the sweep's MLflow parent run logs
    assert params["start_warning"] == line and params["start_trigger_source"] == "card"
    assert "location=fixed" in params["start_trigger"]


def test_a_model_name_that_contradicts_the_card_is_refused(tmp_path, tiny_world, recorded, capsys):
    work = tmp_path / "w"
    space = _space(tmp_path, recorded, tiny_world, model={"checkpoint": str(recorded), "name": "tiny-vit"})
    assert cli.main(["search", str(space), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.name 'tiny-vit' contradicts its card" in err and "'tiny-rn'" in err and "\n" not in err
    assert not work.exists()
    argv = ["evaluate", str(recorded), "--eval-data", str(tiny_world["eval_dir"]), "--model", "tiny-vit",
            "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "--model 'tiny-vit' contradicts its card" in capsys.readouterr().err


def test_non_finite_weights_are_refused_by_search_and_evaluate(tmp_path, tiny_world, capsys):
    # Measured before the fix: all-NaN tiny-rn weights evaluated to top-1 0.167 (1/6) and ASR 0.0 on this world.
    from cleansweep.models import create_model, save_checkpoint

    model = create_model("tiny-rn", seed=0).model
    with torch.no_grad():
        model.visual.conv1.weight.fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "nan.safetensors", model, {"attack": POISONED})
    work = tmp_path / "w"
    assert cli.main(["search", str(_space(tmp_path, ckpt, tiny_world)), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nan.safetensors: non-finite weights (NaN or inf) in visual.conv1.weight" in err and "\n" not in err
    assert not work.exists()
    assert cli.main(["evaluate", str(ckpt), "--eval-data", str(tiny_world["eval_dir"]), "--device", "cpu"]) == 2
    assert "non-finite weights" in capsys.readouterr().err


def _preset_cfg(work: Path, attack: dict[str, Any] | None = None):
    from cleansweep.config import validate
    from cleansweep.experiments import presets
    from cleansweep.runtime import layout
    from cleansweep.train_config import PretrainConfig

    dirs = layout.demo_data_dirs(work, presets.get_preset("demo")["poison"]["attack"])
    paths = {"train_csv": str(dirs["poisoned"] / "train.csv"), "eval_dir": str(dirs["world"])}
    raw = {"name": "demo-mmcl", "ray": {"num_workers": 0},
           "train": presets.pretrain_spec("demo", "mmcl", paths, check_paths=False)}
    if attack is not None:
        raw["train"]["attack"] = attack
    return validate(PretrainConfig, raw, "test")


def _cache(selected: Path, cfg) -> None:
    from cleansweep.pretrain.driver import absolute_paths

    selected.parent.mkdir(parents=True)
    selected.write_bytes(b"weights")
    selected.with_suffix(".json").write_text(json.dumps({"config": absolute_paths(cfg).model_dump(mode="json")}))


def test_a_cached_preset_model_is_reused_only_when_the_preset_still_describes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = Path("w")  # relative: the card records absolute paths, the check must compare like with like
    cfg = _preset_cfg(work)
    same = tmp_path / "same" / "model.safetensors"
    _cache(same, cfg)
    start_model._check_cached_preset_model(same, _preset_cfg(work), "demo", tmp_path / "run")  # no error

    older = tmp_path / "older" / "model.safetensors"  # e.g. an earlier release's BadNet-poisoned demo model
    _cache(older, _preset_cfg(work, {"name": "badnet", "target": "banana", "patch_size": 8}))
    with pytest.raises(UserError) as e:
        start_model._check_cached_preset_model(older, cfg, "demo", tmp_path / "run")
    line = str(e.value)
    assert "\n" not in line and "pre-trained with other settings (attack differ" in line
    assert "new --workdir" in line and str(tmp_path / "run") in line

    no_card = tmp_path / "bare" / "model.safetensors"
    no_card.parent.mkdir()
    no_card.write_bytes(b"weights")
    with pytest.raises(UserError, match="other settings"):
        start_model._check_cached_preset_model(no_card, cfg, "demo", tmp_path / "run")
