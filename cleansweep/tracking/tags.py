"""The names cleansweep writes into MLflow: run tags, pre-training tags and the step sentinel metric.

Every MLflow tag cleansweep writes or reads is named here (docs/interfaces.md, "MLflow layout"); readers and
writers import the names instead of spelling them. No MLflow import: these are plain strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

KEY_TAG = "cleansweep.key"  # stable identity of a run: a re-run or resume finds it again
KIND_TAG = "cleansweep.kind"  # pretrain | sweep | trial
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
SWEEP_TAG = "cleansweep.sweep"
TRIAL_ID_TAG = "cleansweep.trial_id"
STAGE_TAG = "cleansweep.stage"  # preselect | main
SAMPLED_TAG = "cleansweep.sampled"  # the trial's sampled hyperparameters as JSON
BEST_CKPT_TAG = "cleansweep.best_checkpoint"  # storage path of the trial's best feasible checkpoint
BEST_STEP_TAG = "cleansweep.best_step"
ERROR_TAG = "cleansweep.error"
STOPPED_TAG = "cleansweep.stopped_early"  # "true" when the scheduler (ASHA) or the time budget ended the trial
LOST_TAG = "cleansweep.lost"  # a trial run Tune lost in a driver kill (see `trials.tag_lost_trials`)
STALE_TAG = "cleansweep.stale"
NODE_TAG = "cleansweep.node"  # the Ray node a trial ran on
BEST_MODEL_TAG = "cleansweep.best_model"  # on a sweep's parent run: registered model name and version
BEST_MODEL_PROBLEM_TAG = "cleansweep.best_model_problem"  # on a parent run: why its best model was not delivered
_PRETRAIN_TAGS = {"objective": "cleansweep.objective", "dataset": "cleansweep.dataset",
                  "train_csv_sha256": "cleansweep.train_csv_sha256",
                  "train_shards_sha256": "cleansweep.train_shards_sha256", "attack": "cleansweep.attack",
                  "target": "cleansweep.target", "eval_dir": "cleansweep.eval_dir",
                  "poison_manifest_sha256": "cleansweep.poison_manifest_sha256",
                  "worker_nodes": "cleansweep.worker_nodes", "num_nodes": "cleansweep.num_nodes",
                  "selection": "cleansweep.selection", "selected_step": "cleansweep.selected_step",
                  "selected_zeroshot_top1": "cleansweep.selected_zeroshot_top1",
                  "selected_asr_top1": "cleansweep.selected_asr_top1", "selected_path": "cleansweep.selected_path"}
STEP_METRIC = "step"  # sentinel: logged with every batch, its history tells a resumed run where it stopped


def pretrain_tags(**values: Any) -> dict[str, str]:
    """Tags of a pre-training run from plain names (`objective=`, `dataset=`, `selected_step=`, ...; see
    `_PRETRAIN_TAGS`); None values are left out."""
    unknown = set(values) - set(_PRETRAIN_TAGS)
    if unknown:
        raise ValueError(f"unknown pre-training tag(s) {sorted(unknown)}; known: {sorted(_PRETRAIN_TAGS)}")
    return {_PRETRAIN_TAGS[k]: str(v) for k, v in values.items() if v is not None}


def pretrain_tag(name: str) -> str:
    """The MLflow tag key of one pre-training field (for readers filtering runs)."""
    return _PRETRAIN_TAGS[name]


def trial_tags(stage: str, sampled: Mapping[str, Any], node: str | None = None) -> dict[str, str]:
    """Tags a trial run starts with: its stage, its sampled hyperparameters (JSON) and the Ray node it runs on."""
    tags = {STAGE_TAG: stage, SAMPLED_TAG: json.dumps(dict(sampled), default=str)}
    return {**tags, NODE_TAG: node} if node else tags


def tag_filter(key: str, value: str) -> str:
    """The `search_runs` filter clause "tag `key` equals `value`", with quotes in the value escaped."""
    quoted = str(value).replace("'", "\\'")
    return f"tags.`{key}` = '{quoted}'"
