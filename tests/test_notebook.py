"""The analysis notebook runs top to bottom on a small sweep and reports the numbers that sweep holds.

Parameterised through the environment (CLEANSWEEP_SWEEP, CLEANSWEEP_TRACKING_URI), executed with nbclient in a real
Jupyter kernel; the store is a real sqlite MLflow store (tests/sweep_store.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from sweep_store import SWEEP, THRESHOLD, TRIALS, make_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_sweep.ipynb"


def test_notebook_runs_on_a_small_sweep(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_sweep(uri)
    monkeypatch.setenv("CLEANSWEEP_SWEEP", SWEEP)
    monkeypatch.setenv("CLEANSWEEP_TRACKING_URI", uri)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # Pareto, trajectories, lr plot

    last = "".join(o.get("text", "") for o in nb.cells[-2].outputs if o.output_type == "stream")
    numbers = json.loads(last.strip().splitlines()[-1])
    points = [(t1, asr) for _, _, _, pts in TRIALS.values() for _, t1, asr in pts]
    assert numbers["evaluations"] == numbers["pareto_points"] == len(points)
    assert numbers["trials"] == len(TRIALS)
    assert numbers["best_top1"] == pytest.approx(max(t1 for t1, asr in points if asr <= THRESHOLD))
    assert numbers["trials_feasible_at_end"] == sum(pts[-1][2] <= THRESHOLD for _, _, _, pts in TRIALS.values())
