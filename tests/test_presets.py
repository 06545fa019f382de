"""Presets: every preset becomes a pre-training config and a cleaning spec that validate, its data lands under the
working directory, and a wrong name or a missing path is refused in one line. Behaviour only: the demo's numbers
are calibrated in benchmarks/calibrate_demo.py and may change."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleansweep import cli
from cleansweep.attacks.poison import TRIGGERS  # the registry, re-exported where poisoning uses it
from cleansweep.config import validate
from cleansweep.errors import UserError
from cleansweep.experiments import presets
from cleansweep.methods import list_methods
from cleansweep.models import list_models
from cleansweep.runtime import layout
from cleansweep.train_config import PretrainConfig, TrainSpec

CASES = [(p, o) for p in presets.list_presets() for o in layout.OBJECTIVES]


def _user_paths(root: Path) -> dict[str, str]:
    """Existing files standing in for a user's data (the paper presets only check that they exist)."""
    (root / "eval").mkdir(parents=True)
    for name in ("train.csv", "clean.csv", "init.safetensors"):
        (root / name).write_text("")
    return {"train_csv": str(root / "train.csv"), "clean_csv": str(root / "clean.csv"), "eval_dir": str(root / "eval")}


def test_there_are_presets_and_objectives():
    assert {"demo", "cc3m", "cc6m"} <= set(presets.list_presets()) and len(CASES) >= 6


@pytest.mark.parametrize("preset,objective", CASES)
def test_every_preset_pretrains_with_a_valid_config(preset, objective, tmp_path):
    paths = _user_paths(tmp_path)
    spec = presets.pretrain_spec(preset, objective, paths)
    cfg = validate(PretrainConfig, {"name": layout.preset_run_name(preset, objective), "train": spec}, preset)
    train = cfg.train
    assert (str(train.data.train_csv), str(train.data.eval_dir)) == (paths["train_csv"], paths["eval_dir"])
    assert train.method.name == "contrastive" and train.method.name in list_methods()
    assert {"mmcl_weight": train.method.mmcl_weight, "ssl_weight": train.method.ssl_weight} == \
        layout.objective_weights(objective)
    assert train.model.name in list_models() and train.attack.name in TRIGGERS and train.model.init is None


@pytest.mark.parametrize("preset", presets.list_presets())
def test_every_preset_cleans_with_a_valid_spec(preset, tmp_path):
    paths = _user_paths(tmp_path)
    init = tmp_path / "init.safetensors"
    spec = validate(TrainSpec, presets.clean_spec(preset, paths, init), preset)
    assert spec.model.init == init and str(spec.data.train_csv) == paths["clean_csv"]
    assert spec.method.name in list_methods() and spec.attack.name in TRIGGERS
    # Cleaning measures ASR with the trigger the preset poisoned with.
    pre = validate(TrainSpec, presets.pretrain_spec(preset, "mmcl", paths), preset)
    assert spec.attack == pre.attack and spec.model.name == pre.model.name


@pytest.mark.parametrize("preset", presets.list_presets())
def test_overrides_come_last_and_init_is_carried(preset, tmp_path):
    paths = {**_user_paths(tmp_path), "init": str(tmp_path / "init.safetensors")}
    spec = validate(TrainSpec, presets.pretrain_spec(preset, "mmcl+ssl", paths, epochs=1, **{"optim.lr": 0.25}), "t")
    assert (spec.epochs, spec.optim.lr, spec.model.init) == (1, 0.25, tmp_path / "init.safetensors")
    clean = validate(TrainSpec, presets.clean_spec(preset, paths, paths["init"], **{"method.ssl_weight": 0.5}), "t")
    assert clean.method.ssl_weight == 0.5


def test_get_preset_returns_a_copy():
    presets.get_preset("demo")["pretrain"]["common"]["optim"]["lr"] = -1
    assert presets.get_preset("demo")["pretrain"]["common"]["optim"]["lr"] > 0


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("call", [lambda: presets.get_preset("cc12m"),
                                  lambda: presets.pretrain_spec("cc12m", "mmcl", {}, check_paths=False),
                                  lambda: presets.clean_spec("cc12m", {}, "x")])
def test_an_unknown_preset_is_refused_naming_the_choices(call):
    with pytest.raises(UserError) as err:
        call()
    assert _one_line(err) == f"unknown preset 'cc12m'; choose from: {', '.join(presets.list_presets())}"


def test_an_unknown_objective_is_refused():
    with pytest.raises(UserError) as err:
        presets.pretrain_spec("demo", "ssl", {}, check_paths=False)
    assert _one_line(err).startswith("unknown objective 'ssl'; choose from: mmcl")


def test_missing_paths_are_refused_naming_the_flag(tmp_path):
    paths = _user_paths(tmp_path)
    with pytest.raises(UserError) as err:
        presets.pretrain_spec("cc3m", "mmcl", {"eval_dir": paths["eval_dir"]})
    assert "'train_csv'" in _one_line(err) and "--train-csv" in str(err.value)
    with pytest.raises(UserError) as err:
        presets.clean_spec("cc3m", paths, tmp_path / "absent.safetensors")
    assert "absent.safetensors does not exist" in _one_line(err)


def test_the_cli_refuses_an_unknown_preset_in_one_line_and_writes_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    assert cli.main(["pretrain", "--preset", "cc12m", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'cc12m'" in err
    assert not work.exists()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("work")
    return work, presets.prepare_demo_data(work)


def test_the_demo_builds_its_data_under_the_workdir(demo_data):
    work, paths = demo_data
    assert paths and all(Path(p).is_relative_to(work) and Path(p).exists() for p in paths.values())
    dirs = layout.demo_data_dirs(work, presets.get_preset("demo")["poison"]["attack"])
    assert Path(paths["world_dir"]) == dirs["world"] and Path(paths["poison_dir"]) == dirs["poisoned"]
    assert paths["train_csv"] != paths["clean_train_csv"]  # pre-training reads the poisoned copy


def test_the_demo_data_is_built_once(demo_data):
    work, paths = demo_data
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert presets.prepare_demo_data(work) == paths
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == before


def test_the_demo_specs_validate_on_the_built_data(demo_data, tmp_path):
    work, paths = demo_data
    for objective in layout.OBJECTIVES:
        spec = validate(TrainSpec, presets.pretrain_spec("demo", objective, paths), objective)
        assert spec.data.train_csv.is_file() and spec.data.eval_dir.is_dir()
    init = tmp_path / "model.safetensors"
    init.write_text("")
    clean = validate(TrainSpec, presets.clean_spec("demo", paths, init), "clean")
    assert clean.data.train_csv.is_file() and Path(clean.data.train_csv).is_relative_to(work)
