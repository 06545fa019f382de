"""Scratch folders: where a run's in-flight checkpoint directories are written before Ray copies them to storage.

A process killed hard mid-report (kill -9 of the driver, a lost node) leaves the directory it was writing behind:
~100 MB for tiny-rn with its AdamW state. Keyed by the owning run's folder (a sweep, a pre-training run), the next
attempt of the same trial or worker and the owner's end clear them instead of the temp folder filling up.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def name(owner: str | Path) -> str:
    """The scratch folder's name, under each node's temp folder, of the run kept in folder `owner`."""
    return "cleansweep-scratch-" + hashlib.sha1(str(Path(owner).resolve()).encode()).hexdigest()[:12]


@contextmanager
def folder(scratch: str, part: str) -> Iterator[Path]:
    """An empty folder `part` (a trial, a worker rank) in scratch folder `scratch` on this node for the block, removed
    after it; what an earlier, killed attempt left there is removed first."""
    path = Path(tempfile.gettempdir()) / scratch / part
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove(scratch: str) -> None:
    """Delete scratch folder `scratch` on this node (call when its run is over)."""
    shutil.rmtree(Path(tempfile.gettempdir()) / scratch, ignore_errors=True)
