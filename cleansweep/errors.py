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
