"""`cleansweep matrix`: its tables by hand, every cell's sweep config valid, one real cell end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cleansweep.cli import main
from cleansweep.errors import UserError
from cleansweep.experiments import matrix


def test_every_method_cell_is_a_valid_sweep(tmp_path):
    # Each cell's space goes through the same checks as a YAML file (keys exist, every candidate value valid).
    ckpt = tmp_path / "m.safetensors"
    card = {"checkpoint": str(ckpt), "attack_spec": {"name": "badnet", "target": "banana", "patch_size": 8}}
    paths = {"clean_csv": str(tmp_path / "clean.csv"), "eval_dir": str(tmp_path / "eval")}
    for method in matrix.MATRIX_METHODS:
        cfg = matrix.cell_config(method, card, paths, "sqlite:////tmp/x.db", epochs=2, num_samples=3)
        assert cfg.search.num_samples == 3 and cfg.epochs == 2 and cfg.attack.patch_size == 8
        assert str(cfg.model.checkpoint) == str(ckpt)


def test_unknown_names_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown attack 'nope'.*badnet"):
        matrix.run_matrix(workdir=tmp_path, attacks=["nope"])
    assert main(["matrix", "--methods", "cleanclip,nope", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: matrix: unknown method 'nope'") and "\n" not in err
    assert main(["study", "toy", "--attacks", "badnet", "--workdir", str(tmp_path)]) == 2
    assert "cleansweep matrix" in capsys.readouterr().err


def test_study_matrix_is_a_deprecated_alias(tmp_path, capsys):
    # The old spelling still runs the matrix command, after one line naming the new one.
    assert main(["study", "matrix", "--methods", "cleanclip,nope", "--workdir", str(tmp_path)]) == 2
    note, err = capsys.readouterr().err.strip().splitlines()
    assert note == "note: `cleansweep study matrix` is deprecated; run `cleansweep matrix` (same flags)"
    assert err.startswith("error: matrix: unknown method 'nope'")


def test_matrix_table_and_markdown_by_hand():
    cells = [{"attack": "badnet", "method": "cleanclip", "top1": 0.9, "zeroshot_top1": 0.9512, "asr_top1": 0.012},
             {"attack": "badnet", "method": "l2_init", "zeroshot_top1": math.nan, "asr_top1": math.nan}]
    starts = {"badnet": {"fraction": 0.05, "zeroshot_top1": 0.92, "asr_top1": 0.97}}
    table = matrix.matrix_table(cells, starts)
    assert table.loc[0, "cleanclip"] == 0.9512 and table.loc[0, "cleanclip_asr"] == 0.012
    assert pd.isna(table.loc[0, "l2_init"])
    md = matrix.markdown_matrix(table, ["cleanclip", "l2_init"])
    row = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert row == ["badnet (5%)", "92.0% / 97.0%", "95.1% (1.2%)", "-"]


@pytest.mark.integration
def test_one_cell_end_to_end(tmp_path, monkeypatch, capsys):
    # The demo world, one structured trigger, one method, the smallest budget: every stage really runs.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()
    work = tmp_path / "work"
    result = matrix.run_matrix(workdir=work, attacks=["triangle"], methods=["cleanclip"], pretrain_epochs=1,
                               clean_epochs=1, num_samples=1, max_tries=1, echo=lambda line: None)
    AuthenticationTokenLoader.instance().reset_cache()
    calib, table = result["calibration"], result["table"]
    assert list(calib["attack"]) == ["triangle"] and calib.loc[0, "fraction"] == matrix.ATTACKS["triangle"]["fraction"]
    card = json.loads((work / "pretrain" / calib.loc[0, "run"] / "selected" / "model.json").read_text())
    assert card["config"]["train"]["attack"]["name"] == "triangle"  # the model's ASR is measured with its trigger
    assert table.loc[0, "start_asr"] == pytest.approx(card["asr_top1"])
    cell = result["cells"][0]
    assert cell["sweep"] == "matrix-triangle-cleanclip" and cell["trials"] == 1
    out = work / "study" / "matrix"
    assert json.loads((out / "matrix.json").read_text())["complete"] is True
    assert "triangle" in (out / "matrix.md").read_text()
