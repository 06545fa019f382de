"""Whether a sweep name can be used: its alphabet, and free for a new sweep or taken for `--resume`."""

from __future__ import annotations

from cleansweep.config import check_name
from cleansweep.errors import UserError
from cleansweep.runtime import layout, storage


def check_sweep_name(name: str, sweep_dir: storage.Location, *, resume: bool, in_mlflow: bool = False) -> str:
    """Every check of a sweep name, as one-line errors before anything starts.

    The name becomes a folder and an MLflow run name, so it keeps to a safe alphabet (`config.check_name`); a new
    sweep needs a free name (no sweep folder and, once MLflow was asked, no parent run); `--resume` needs an existing
    sweep folder.

    Args:
        name: The sweep name (`--name`, else the YAML's `name`, else the file stem).
        sweep_dir: Where sweep `name` lives (`driver.sweep_location`): a folder or an object-storage URI.
        resume: Whether the sweep is to be resumed.
        in_mlflow: Whether MLflow already holds a parent run of that name (False before MLflow was asked).

    Returns:
        `name`, accepted.

    Raises:
        UserError: naming the problem and the fix.
    """
    try:
        check_name(name)
    except ValueError as e:
        raise UserError(f"--name: {e}") from None
    exists = storage.is_file(storage.join(sweep_dir, layout.SWEEP_FILE))
    if resume and not exists:
        raise UserError(f"--resume: no sweep named {name!r} in {storage.parent(sweep_dir)}; drop --resume to start it, "
                        "or pass the --storage-path it ran with")
    if not resume and (exists or in_mlflow):
        where = sweep_dir if exists else "MLflow"
        raise UserError(f"sweep {name!r} already exists ({where}); pass --resume to continue it, or choose another "
                        "--name")
    return name
