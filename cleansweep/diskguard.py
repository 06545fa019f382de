"""Old home of the disk guard (now `cleansweep.runtime.diskguard`), kept so that `Tuner.restore` of a sweep started
before the move still unpickles its callbacks, which name `cleansweep.diskguard.DiskGuard`."""

from cleansweep.runtime.diskguard import DiskGuard  # noqa: F401 - a name pickled by older sweeps
