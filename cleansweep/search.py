"""Old home of the sweep driver, kept so that `Tuner.restore` of a sweep started before the move to `cleansweep.sweep`
still unpickles: Tune's saved state names its searcher, callbacks, reporter and trial function by module path.
New code imports `cleansweep.sweep.*`."""

from cleansweep.sweep.driver import (  # noqa: F401 - names pickled by older sweeps
    AlreadyFailed,
    ConstrainedOptunaSearch,
    TrialContext,
    TrialEndCallback,
    TrialReporter,
    TrialTable,
    clean_trial,
    search,
)
