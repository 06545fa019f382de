"""A sweep started before the sweep code moved to `cleansweep.sweep` still restores: the state Tune pickled then
(tests/fixtures/old_sweep, made by the old code) names `cleansweep.search`, and today's `cleansweep.search` hands back
the current classes, loaded the way Tune loads them (`ray.cloudpickle`, i.e. `pickle`)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from ray import cloudpickle

from cleansweep.runtime import diskguard
from cleansweep.sweep import driver, records
from cleansweep.sweep.console import TrialTable, _say
from cleansweep.sweep.lifecycle import AlreadyFailed, TrialEndCallback
from cleansweep.sweep.optuna import ConstrainedOptunaSearch

OLD = Path(__file__).parent / "fixtures" / "old_sweep"
class _Recording(pickle.Unpickler):
    """pickle's unpickler, noting every global the data names."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.names: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.names.add((module, name))
        return super().find_class(module, name)


def _load(file: str) -> tuple[object, set[tuple[str, str]]]:
    unpickler = _Recording((OLD / file).read_bytes())
    return unpickler.load(), unpickler.names


def test_the_old_state_names_cleansweep_search():
    # Without the alias module none of these would load: the bytes name the old module path.
    for file in ("tuner.pkl", "search_gen_state.json", "error.pkl"):
        assert b"cleansweep.search" in (OLD / file).read_bytes(), file
    named = {n for f in ("tuner.pkl", "search_gen_state.json", "error.pkl") for m, n in _load(f)[1]
             if m == "cleansweep.search"}
    assert named == {"ConstrainedOptunaSearch", "TrialEndCallback", "TrialTable", "_trial_dirname", "AlreadyFailed"}


def test_the_other_old_module_paths_still_resolve():
    # The same state also names classes of modules that moved in the reorganisation; pickle finds each by its old
    # path: `cleansweep.config.Domain` (moved down into config), and the alias modules `spaces` and `diskguard`.
    from cleansweep.config import Domain
    from cleansweep.runtime.diskguard import DiskGuard
    from cleansweep.sweep.space import DefineByRun

    names = set().union(*(_load(f)[1] for f in ("tuner.pkl", "search_gen_state.json", "error.pkl")))
    old = {(m, n) for m, n in names if m.startswith("cleansweep.") and not m.startswith("cleansweep.search")}
    assert old == {("cleansweep.config", "Domain"), ("cleansweep.spaces", "DefineByRun"),
                   ("cleansweep.diskguard", "DiskGuard")}
    found = {(m, n): pickle.Unpickler(io.BytesIO(b"")).find_class(m, n) for m, n in old}
    assert found == {("cleansweep.config", "Domain"): Domain, ("cleansweep.spaces", "DefineByRun"): DefineByRun,
                     ("cleansweep.diskguard", "DiskGuard"): DiskGuard}


def test_an_old_tuner_state_unpickles_to_the_current_classes():
    state, _ = _load("tuner.pkl")
    tune_config, run_config = state["_tune_config"], state["_run_config"]
    searcher = tune_config.search_alg
    assert type(searcher) is ConstrainedOptunaSearch
    assert (searcher._constraint_metric, searcher._threshold, searcher._study_name) == (
        "min_asr_top1", 0.05, "cleansweep-old-main")
    assert tune_config.trial_dirname_creator is driver._trial_dirname
    table = run_config.progress_reporter
    assert type(table) is TrialTable and table.echo is _say and (table.params, table.epochs) == (["optim.lr"], 1)
    ends = [c for c in run_config.callbacks if isinstance(c, TrialEndCallback)]
    assert len(ends) == 1 and ends[0].sweep == "old" and ends[0].epochs == 1
    assert any(type(c) is diskguard.DiskGuard for c in run_config.callbacks)
    # The restored searcher works with today's code: it samples the old space and tells Optuna the constraint.
    config = searcher.suggest("t-new")
    assert 1e-4 <= config["optim.lr"] <= 1e-3 and config["variant"] == "contrastive"
    searcher.on_trial_complete("t-new", {searcher.metric: 0.5, "min_asr_top1": 0.02})
    told = searcher._ot_study.get_trials()[-1]
    assert told.state.name == "COMPLETE" and told.constraints == {"min_asr_top1": 0.02 - 0.05}


def test_an_old_search_generator_state_loads_as_tune_loads_it():
    state = cloudpickle.loads((OLD / "search_gen_state.json").read_bytes())
    assert state["experiment"].spec["trial_dirname_creator"] is driver._trial_dirname


def test_an_old_trial_error_is_still_recognised_as_already_failed():
    # The driver keeps a failed trial's cause when its recorded error is AlreadyFailed (`TrialEndCallback`).
    error = cloudpickle.loads((OLD / "error.pkl").read_bytes())
    assert records.error_is(error, AlreadyFailed) and isinstance(error, AlreadyFailed)
    assert "failed before this resume" in str(error)
