"""Atomic file writes: a reader (or a crash) never sees a half-written file or folder.

The one writer every module uses (checkpoints and cards, run identities, leaderboards, reports, study logs): write
to a temporary name in the destination's folder, then rename over the destination, which POSIX makes atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`; returns `path`."""
    path = Path(path)
    # A unique name (not mkstemp: its 0600 mode would stick to checkpoints other processes of the user read).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (non-JSON values as strings) to `path` atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_dir(src: str | Path, dest: str | Path) -> Path:
    """Move folder `src` to `dest`, replacing it; a crash leaves either the old or the new folder complete.

    While the swap is in flight the previous folder is kept as `.<dest>.old` (`previous_dir` finds it).
    """
    src, dest = Path(src), Path(dest)
    old = previous_dir(dest)
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def previous_dir(dest: str | Path) -> Path:
    """Where `replace_dir` keeps the folder it is replacing until the new one is in place."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.old")
