"""Old home of the sweep driver, kept so that `Tuner.restore` of a sweep started before the move to `cleansweep.sweep`
still unpickles: Tune's saved state (tuner.pkl, search_gen_state-*.json, a trial's pickled error) names the searcher,
the callbacks, the progress reporter, the trial-folder namer and the trial's exceptions by module path.
Each name is re-exported from its new home; new code imports `cleansweep.sweep.*`."""

from cleansweep.sweep.console import TrialTable, _say  # noqa: F401 - names pickled by older sweeps
from cleansweep.sweep.driver import _trial_dirname, search  # noqa: F401
from cleansweep.sweep.lifecycle import AlreadyFailed, TrialEndCallback  # noqa: F401
from cleansweep.sweep.optuna import ConstrainedOptunaSearch  # noqa: F401
from cleansweep.sweep.trial import TrialContext, TrialReporter, clean_trial  # noqa: F401
