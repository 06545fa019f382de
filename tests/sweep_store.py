"""A small sweep-shaped MLflow store with numbers chosen by hand (docs/interfaces.md "MLflow layout").

Real MLflow (sqlite), no Ray: report, notebook and UI tests read it back and compare with these numbers. The trials
cover the cases the report distinguishes: cleaned and ending feasible, feasible only mid-trajectory, never feasible,
failed early; one step is logged twice (a resumed trial) and the newer value must win.
"""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

SWEEP = "toy-sweep"
THRESHOLD = 0.05
START = {"zeroshot_top1": 0.80, "asr_top1": 0.97}
# trial id -> (status, optim.lr, method.ssl_weight, [(epoch, top1, asr), ...]); one evaluation per epoch, 10 steps each.
TRIALS = {
    "t0": ("FINISHED", 1e-3, 1.0, [(0, 0.80, 0.97), (1, 0.78, 0.40), (2, 0.79, 0.08), (3, 0.80, 0.04),
                                   (4, 0.81, 0.03)]),
    "t1": ("FINISHED", 3e-3, 4.0, [(0, 0.80, 0.97), (1, 0.70, 0.20), (2, 0.72, 0.04), (3, 0.69, 0.09),
                                   (4, 0.66, 0.12)]),
    "t2": ("FINISHED", 1e-4, 1.0, [(0, 0.80, 0.97), (1, 0.80, 0.90), (2, 0.81, 0.85), (3, 0.80, 0.80),
                                   (4, 0.80, 0.75)]),
    "t3": ("FAILED", 7e-3, 8.0, [(0, 0.80, 0.97), (1, 0.60, 0.50)]),
}
RELOGGED = ("t0", 2, 0.50)  # trial t0 first logged asr 0.50 at epoch 2, then (after a resume) 0.08
# A preselect-stage trial (two-stage shrink-and-perturb) under the same parent: the report must leave it out.
PRESELECT = ("p0", [(0, 0.95, 0.01)])


def make_sweep(tracking_uri: str, name: str = SWEEP, *, experiment: str = "cleansweep",
               start_metrics: bool = True) -> str:
    """Log the sweep into `tracking_uri`; return the parent run id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    eid = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(eid, run_name=name, tags={"cleansweep.kind": "sweep", "cleansweep.sweep": name})
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param("optim.lr", "loguniform(1e-4, 1e-2)"), Param("method.ssl_weight",
                                  "choice([1, 4, 8])"), Param("asr_threshold", str(THRESHOLD)),
                                  Param("num_samples", str(len(TRIALS)))])
    if start_metrics:
        client.log_batch(pid, metrics=[Metric(f"start_{k}", v, _now(), 0) for k, v in START.items()])
    runs = [(t, "main", *v) for t, v in TRIALS.items()] + [(PRESELECT[0], "preselect", "FINISHED", 0.0, 0.0,
                                                            PRESELECT[1])]
    for trial_id, stage, status, lr, ssl, points in runs:
        sampled = {"optim.lr": lr, "method.ssl_weight": ssl}
        run = client.create_run(eid, run_name=f"{name}-{trial_id}", tags={
            "mlflow.parentRunId": pid, "cleansweep.kind": "trial", "cleansweep.sweep": name,
            "cleansweep.trial_id": trial_id, "cleansweep.stage": stage, "cleansweep.sampled": json.dumps(sampled)})
        rid = run.info.run_id
        client.log_batch(rid, params=[Param("optim.lr", str(lr)), Param("method.ssl_weight", str(ssl)),
                                      Param("model.name", "tiny-rn"), Param("epochs", "4")])
        best = 0.0
        for epoch, top1, asr in points:
            if (trial_id, epoch) == RELOGGED[:2]:
                client.log_batch(rid, metrics=_evaluation(epoch, top1, RELOGGED[2], best, lr))
            feasible = asr <= THRESHOLD
            best = max(best, top1) if feasible else best
            client.log_batch(rid, metrics=_evaluation(epoch, top1, asr, best, lr))
        client.set_terminated(rid, status=status)
    client.set_terminated(pid)
    return pid


def _now() -> int:
    time.sleep(0.002)  # distinct millisecond timestamps, so "newest value wins" is well defined
    return int(time.time() * 1000)


def _evaluation(epoch: int, top1: float, asr: float, best: float, lr: float) -> list[Metric]:
    ts, step = _now(), 10 * epoch
    values = {"zeroshot_top1": top1, "zeroshot_top5": min(1.0, top1 + 0.1), "asr_top1": asr,
              "feasible": float(asr <= THRESHOLD), "best_feasible_top1": best, "epoch": float(epoch), "lr": lr,
              "loss": 2.0 / (1 + epoch)}
    return [Metric(k, v, ts, step) for k, v in values.items()]


