"""Scratch folders for in-flight checkpoints: one per owning run, per node; a killed attempt's leftovers cleared."""

from __future__ import annotations

import tempfile

from cleansweep.runtime import scratch


def test_scratch_is_per_owner_and_clears_a_killed_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = scratch.name(tmp_path / "sweeps" / "s"), scratch.name(tmp_path / "other" / "s")
    assert a != b and a == scratch.name(tmp_path / "sweeps" / "x" / ".." / "s")  # same folder, other spelling
    (tmp_path / a / "t1" / "cleansweep-ckpt-left").mkdir(parents=True)  # what a trial killed mid-report leaves
    (tmp_path / a / "t2" / "in-flight").mkdir(parents=True)  # another trial, still running
    with scratch.folder(a, "t1") as again:
        assert again == tmp_path / a / "t1" and list(again.iterdir()) == []
    assert not again.exists()  # removed once its block ends
    assert (tmp_path / a / "t2" / "in-flight").is_dir()  # another trial's folder is left alone
    scratch.remove(a)
    assert not (tmp_path / a).exists()
    scratch.remove(a)  # removing twice is fine
