"""Old home of the search-space module (now `cleansweep.sweep.space`), kept so that `Tuner.restore` of a sweep
started before the move still unpickles its searcher, which names `cleansweep.spaces.DefineByRun`."""

from cleansweep.sweep.space import DefineByRun  # noqa: F401 - a name pickled by older sweeps
