"""runtime.atomic (the one writer: no reader or crash ever sees half a file or folder) and runtime.layout (every
name and place on disk, the objectives table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cleansweep.config import check_name
from cleansweep.methods import method_spec
from cleansweep.runtime import atomic, layout


class WriterCrashed(Exception):
    pass


def _crash_halfway(tmp: Path) -> None:
    """A writer that gets half of its bytes onto disk, then dies (a full disk, a bug, a kill signal)."""
    with open(tmp, "w") as f:
        f.write('{"half": ')
        f.flush()
        os.fsync(f.fileno())
    raise WriterCrashed


# ------------------------------------------------------------------------------------------------ atomic
def test_a_writer_that_dies_midway_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = atomic.write_json(tmp_path / "card.json", {"step": 1})
    with pytest.raises(WriterCrashed):
        atomic.write_atomic(path, _crash_halfway)
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]  # the temporary file is gone too


def test_a_writer_that_dies_before_the_first_write_leaves_nothing(tmp_path):
    with pytest.raises(WriterCrashed):
        atomic.write_atomic(tmp_path / "new.json", _crash_halfway)
    assert list(tmp_path.iterdir()) == []


def test_replacing_swaps_the_whole_file_under_an_open_reader(tmp_path):
    path = atomic.write_text(tmp_path / "board.csv", "old\n" * 1000)
    with open(path) as reader:
        atomic.write_text(path, "new\n")
        # rename(2) replaced the directory entry: the open file is still the complete old one, never a mix.
        assert reader.read() == "old\n" * 1000
    assert path.read_text() == "new\n"


def test_written_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "model.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_json_is_indented_json_with_non_json_values_as_strings(tmp_path):
    path = atomic.write_json(tmp_path / "run.json", {"init": Path("/a/b.safetensors"), "lr": 1e-3, "ok": True})
    text = path.read_text()
    assert text.endswith("}\n") and "\n  " in text
    assert json.loads(text) == {"init": "/a/b.safetensors", "lr": 1e-3, "ok": True}


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_replace_dir_swaps_the_folder_and_keeps_no_old_copy(tmp_path):
    dest = _folder(tmp_path / "selected", {"model.safetensors": "old", "stale.txt": "x"})
    src = _folder(tmp_path / "incoming", {"model.safetensors": "new", "model.json": "{}"})
    assert atomic.replace_dir(src, dest) == dest
    assert _contents(dest) == {"model.json": "{}", "model.safetensors": "new"}  # stale.txt went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected"]


def test_replace_dir_into_a_new_place(tmp_path):
    src = _folder(tmp_path / "incoming", {"a": "1"})
    atomic.replace_dir(src, tmp_path / "candidate")
    assert _contents(tmp_path / "candidate") == {"a": "1"} and not src.exists()


def test_replace_dir_clears_the_old_copy_a_crashed_swap_left(tmp_path):
    # A crash between the two renames leaves the previous folder as `.<dest>.old` and no dest; the next swap must not
    # trip over it, and must not leave it behind.
    dest = tmp_path / "selected"
    _folder(atomic.previous_dir(dest), {"model.safetensors": "older"})
    atomic.replace_dir(_folder(tmp_path / "incoming", {"model.safetensors": "new"}), dest)
    assert _contents(dest) == {"model.safetensors": "new"}
    assert not atomic.previous_dir(dest).exists()


def test_previous_dir_is_a_hidden_sibling(tmp_path):
    assert atomic.previous_dir(tmp_path / "selected") == tmp_path / ".selected.old"


# ------------------------------------------------------------------------------------------------ layout
def test_objectives_are_the_papers_two_losses():
    # MMCL = the CLIP loss alone; MMCL+SSL = CLIP loss + CleanCLIP's in-modal loss at equal weight (1, 1).
    assert layout.objective_weights("mmcl") == {"mmcl_weight": 1.0, "ssl_weight": 0.0}
    assert layout.objective_weights("mmcl+ssl") == {"mmcl_weight": 1.0, "ssl_weight": 1.0}
    assert [layout.objective_label(o) for o in layout.OBJECTIVES] == ["MMCL", "MMCL+SSL"]
    for objective in layout.OBJECTIVES:  # every objective is a valid contrastive method
        method_spec({"name": "contrastive", **layout.objective_weights(objective)})


def test_objective_weights_is_a_copy():
    layout.objective_weights("mmcl")["ssl_weight"] = 5.0
    assert layout.objective_weights("mmcl")["ssl_weight"] == 0.0


def test_run_names_are_valid_and_distinct_per_objective():
    names = [layout.preset_run_name("demo", o) for o in layout.OBJECTIVES]
    study = layout.study_run_names("toy")
    names += [n for o in layout.OBJECTIVES for n in study[o].values()]
    names.append(layout.trial_run_name("demo", "a1b2c3d4"))
    assert [check_name(n) for n in names] == names  # letters, digits, '_', '.', '-' only
    assert len(set(names)) == len(names)
    assert layout.slug("mmcl+ssl") == "mmcl-ssl" and layout.preset_run_name("demo", "mmcl+ssl") == "demo-mmcl-ssl"
    assert list(layout.study_run_names("toy", ["mmcl"])) == ["mmcl"]


def test_checkpoint_names_sort_by_step():
    steps = [0, 9, 10, 99, 100, 12345]
    assert sorted(layout.checkpoint_name(s) for s in reversed(steps)) == [layout.checkpoint_name(s) for s in steps]
    assert int(layout.checkpoint_name(12345).removeprefix(layout.CHECKPOINT_PREFIX)) == 12345


def test_places_land_under_the_workdir_and_run_folders_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = Path("runs")  # relative, as $CLEANSWEEP_WORKDIR may be: Ray workers run in another CWD
    assert layout.pretrain_dir(work, "p") == tmp_path / "runs/pretrain/p"  # absolute
    assert layout.selected_checkpoint(work, "p") == tmp_path / "runs/pretrain/p/selected/model.safetensors"
    assert layout.sweep_dir(layout.default_storage(work), "s") == tmp_path / "runs/sweeps/s"
    assert layout.demo_data_dirs(work, "sig") == {"world": work / "data/demo", "poisoned": work / "data/demo-sig"}
    for place in (layout.report_dir(work, "s"), layout.study_dir(work, "toy"), layout.scan_dir(work, "ab" * 32, "e")):
        assert place.resolve().is_relative_to(tmp_path / "runs")


def test_sweep_exists_once_its_identity_file_is_written(tmp_path):
    assert not layout.sweep_exists(tmp_path, "s")
    layout.sweep_dir(tmp_path, "s").mkdir()
    assert not layout.sweep_exists(tmp_path, "s")  # a folder alone (e.g. Tune's) is not a started sweep
    atomic.write_json(layout.sweep_dir(tmp_path, "s") / layout.SWEEP_FILE, {"name": "s"})
    assert layout.sweep_exists(tmp_path, "s")


def test_scan_cache_is_one_per_checkpoint_and_evaluation_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sha_a, sha_b = "a" * 64, "b" * 64
    same = layout.scan_dir("w", sha_a, "eval")
    assert same == layout.scan_dir("w", sha_a, str(tmp_path / "eval"))  # relative or absolute: the same folder
    assert len({same, layout.scan_dir("w", sha_a, "other"), layout.scan_dir("w", sha_b, "eval")}) == 3
