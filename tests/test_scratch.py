"""Scratch folders for in-flight checkpoints: one per owning run, per node; a killed attempt's leftovers cleared."""

from __future__ import annotations

import tempfile

from cleansweep import scratch


def test_scratch_is_per_owner_and_clears_a_killed_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = scratch.name(tmp_path / "sweeps" / "s"), scratch.name(tmp_path / "other" / "s")
    assert a != b and a == scratch.name(tmp_path / "sweeps" / "x" / ".." / "s")  # same folder, other spelling
    first = scratch.fresh(a, "t1")
    (first / "cleansweep-ckpt-left").mkdir()  # what a trial killed mid-report leaves
    kept = scratch.fresh(a, "t2")
    (kept / "in-flight").mkdir()
    again = scratch.fresh(a, "t1")
    assert again == tmp_path / a / "t1" and list(again.iterdir()) == []
    assert (kept / "in-flight").is_dir()  # another trial's folder is left alone
    scratch.remove(a)
    assert not (tmp_path / a).exists()
    scratch.remove(a)  # removing twice is fine
