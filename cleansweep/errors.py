"""The one exception type for expected, user-fixable problems.

`cli.main` turns a `UserError` into one line on stderr and exit code 2. Raise it with a message that names the
problem and the fix, e.g. ``UserError("unknown attack 'badnt'; choose from: badnet, blended, sig, wanet")``.
"""


class UserError(Exception):
    """Bad input the user can fix (paths, YAML, flags, CSV rows, images, checkpoints)."""


class DiskFull(KeyboardInterrupt):
    """A sweep stopped, or refused to start, for lack of disk space (`diskguard`). Resumable, hence an interruption:
    MLflow runs end KILLED as for Ctrl-C, and `--resume` continues once space is freed. The CLI prints its one line
    and exits with `diskguard.EXIT_CODE`."""


class NodeOutOfMemory(KeyboardInterrupt):
    """Ray's memory monitor killed a trial worker, and Tune (Ray 2.60) ends the whole experiment on that error
    instead of failing the one trial. Resumable like `DiskFull`: the runs end KILLED and `--resume` continues; the CLI
    prints its one line and exits 75 (EX_TEMPFAIL: try again once memory is free)."""
