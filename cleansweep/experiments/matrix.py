"""`cleansweep matrix`: which cleaning method removes which backdoor? Every attack x every method, demo world.

Per attack: poison the demo world's training set (`ATTACKS`: the calibrated poison fraction and trigger; BadCLIP's
patch is first optimised on a clean demo model), pre-train tiny-rn with MMCL and check that the backdoor took
(`ASR_TAKEN`: ASR >= 0.9 before cleaning; if not, the fraction doubles, at most `MAX_TRIES` times), then run one
small sweep per method (`MATRIX_METHODS`: the demo's learning-rate band and the method's own knob; Optuna TPE under
the ASR constraint, every evaluation in MLflow). Output in `<workdir>/study/matrix/`: `matrix.csv/.md` (per cell the
best top-1 with ASR <= 5% and its ASR, per attack its start), `calibration.csv` (every pre-training try) and
`matrix.json`. Every finished stage is reused when the study runs again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cleansweep.config import MlflowSpec, RaySpec, validate
from cleansweep.errors import UserError
from cleansweep.objective import ASR, TOP1
from cleansweep.results import report
from cleansweep.runtime import atomic, cluster, layout
from cleansweep.sweep.config import SearchConfig
from cleansweep.train_config import PretrainConfig, TrainSpec

ASR_TAKEN = 0.9  # a backdoor "took" when the pre-trained model's ASR reaches this
MAX_TRIES = 3  # poison fraction f, 2f, 4f
TARGET = "banana"
# Calibrated on the demo world (32 px, tiny-rn, MMCL, 6 epochs): the smallest tried fraction whose backdoor took.
ATTACKS: dict[str, dict[str, Any]] = {
    "badnet": {"fraction": 0.05, "params": {"patch_size": 8, "location": "fixed", "patch": "fixed"}},
    "blended": {"fraction": 0.1, "params": {}},
    "sig": {"fraction": 0.05, "params": {}},
    "wanet": {"fraction": 0.2, "params": {}},
    "stripes": {"fraction": 0.05, "params": {}},
    "triangle": {"fraction": 0.05, "params": {"patch_size": 8, "location": "fixed"}},
    "text": {"fraction": 0.05, "params": {"location": "fixed"}},
    "badclip": {"fraction": 0.05, "params": {"patch_size": 8, "location": "fixed"}},
}
# A cell's budget: 4 random trials of 6 epochs each, with the demo's batch and warm-up. In the demo's regime CleanCLIP
# removes a BadNet backdoor only from lr ~1.4e-3 on (docs/calibration.md: the upper 55% of LR's log-range; SIG's from
# below 1e-3): 4 draws all miss that band with probability 0.45^4 = 4%, so an empty cell says "none of 4 trials (24
# evaluations) reached ASR <= 5%" (a screen; more with --num-samples), not "the 2 trials drawn missed the band" as
# the earlier budget (2 trials x 3 epochs) did.
CELL_TRIALS, CELL_EPOCHS = 4, 6
LR = {"loguniform": [5.0e-4, 5.0e-3]}  # where CleanCLIP removes the demo backdoor (search_spaces/demo.yaml)
MATRIX_METHODS: dict[str, dict[str, Any]] = {
    "cleanclip": {"base": {"method.name": "contrastive", "method.ssl_weight": 1}, "space": {"optim.lr": LR}},
    "heavy_reg": {"base": {"method.name": "contrastive", "method.ssl_weight": 1},
                  "space": {"optim.lr": LR, "optim.weight_decay": {"loguniform": [1.0, 100.0]}}},
    "shrink_perturb": {"base": {"method.name": "shrink_perturb", "method.ssl_weight": 1},
                       "space": {"optim.lr": LR, "method.shrink": {"uniform": [0.3, 1.0]},
                                 "method.perturb": {"loguniform": [1.0e-4, 0.1]}}},
    "l2_init": {"base": {"method.name": "l2_init", "method.ssl_weight": 1},
                "space": {"optim.lr": LR, "method.l2_init_weight": {"loguniform": [0.01, 10.0]}}},
    "deep_cluster": {"base": {"method.name": "deep_cluster", "method.ssl_weight": 1, "method.num_clusters": 30},
                     "space": {"optim.lr": LR, "method.cluster_weight": {"loguniform": [0.1, 10.0]}}},
    "perturb_recover": {"base": {"method.name": "perturb_recover", "method.ssl_weight": 0},
                        "space": {"optim.lr": LR, "method.par_weight": {"loguniform": [0.1, 10.0]},
                                  "method.par_cap": {"uniform": [0.05, 1.5]}}},
}


def _check_names(attacks: Sequence[str], methods: Sequence[str]) -> None:
    for given, known, what in ((attacks, ATTACKS, "attack"), (methods, MATRIX_METHODS, "method")):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            name = repr(unknown[0]) if unknown else "(none given)"
            raise UserError(f"matrix: unknown {what} {name}; choose from: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ data
def poisoned_data(attack: str, fraction: float, paths: Mapping[str, str], workdir: Path, *,
                  clean_model: Path | None, seed: int = 0) -> dict[str, Any]:
    """The demo training set poisoned with `attack` at `fraction` (cached), and the AttackSpec it was made with."""
    from cleansweep.attacks.registry import attack_from_manifest

    out = Path(workdir).resolve() / "data" / f"matrix-{attack}-{round(fraction * 1000):03d}"
    common = {"target": TARGET, "fraction": fraction, "seed": seed, **ATTACKS[attack]["params"]}
    if attack == "badclip":
        from cleansweep.attacks.badclip import poison_with_optimised_patch

        manifest = poison_with_optimised_patch(paths["clean_train_csv"], out, checkpoint=clean_model,
                                               images=paths["eval_dir"], **common)
    else:
        from cleansweep.attacks.poison import poison_csv

        manifest = poison_csv(paths["clean_train_csv"], out, attack=attack, image_size=32, **common)
    return {"train_csv": str(out / manifest["output_csv"]), "attack": attack_from_manifest(manifest)}


# ------------------------------------------------------------------------------------------------ pre-training
def _pretrain(name: str, train_csv: str, attack: Mapping[str, Any], paths: Mapping[str, str], workdir: Path,
              uri: str, epochs: int | None) -> dict[str, Any]:
    """Pre-train (or find) run `name` in this process; returns its selected model's card (+ `checkpoint`)."""
    from cleansweep.experiments import presets
    from cleansweep.pretrain.driver import pretrain
    from cleansweep.pretrain.selection import selected_card

    card = selected_card(workdir, name)
    if card is not None:
        return card
    spec = presets.pretrain_spec("demo", "mmcl", {"train_csv": train_csv, "eval_dir": paths["eval_dir"]},
                                 **({"epochs": epochs} if epochs else {}))
    spec["attack"] = dict(attack)
    cfg = PretrainConfig(name=name, train=validate(TrainSpec, spec, f"matrix {name}"), ray=RaySpec(num_workers=0),
                         mlflow=MlflowSpec(tracking_uri=uri, experiment="cleansweep-pretrain"))
    pretrain(cfg, workdir=workdir, resume=layout.pretrain_dir(workdir, name).exists())
    return selected_card(workdir, name)


def calibrated_model(attack: str, paths: Mapping[str, str], workdir: Path, uri: str, *, clean_model: Path | None,
                     epochs: int | None, echo: Callable[[str], None], max_tries: int = MAX_TRIES
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The poisoned model of one attack whose backdoor took (ASR >= ASR_TAKEN), doubling the poison fraction until
    it does (at most `max_tries` fractions); returns its card and every try (fraction, top-1, ASR)."""
    tries, fraction = [], ATTACKS[attack]["fraction"]
    for _ in range(max_tries):
        data = poisoned_data(attack, fraction, paths, workdir, clean_model=clean_model)
        name = f"matrix-{attack}-{round(fraction * 1000):03d}"
        echo(f"[matrix] {attack}: poisoned {fraction:.1%} of the training pairs; pre-training {name}")
        card = _pretrain(name, data["train_csv"], data["attack"], paths, workdir, uri, epochs)
        card = {**card, "attack_spec": data["attack"], "fraction": fraction}
        tries.append({"attack": attack, "fraction": fraction, "run": name, TOP1: card.get(TOP1),
                      ASR: card.get(ASR), "took": float(card.get(ASR) or 0.0) >= ASR_TAKEN})
        if tries[-1]["took"] or fraction * 2 > 0.5:
            break
        fraction *= 2
    return card, tries


# ------------------------------------------------------------------------------------------------ cleaning
def cell_config(method: str, card: Mapping[str, Any], paths: Mapping[str, str], uri: str, *, epochs: int,
                num_samples: int) -> SearchConfig:
    """The sweep of one (attack, method) cell: the method's space on the demo's clean set and the attack's trigger."""
    from cleansweep.methods import list_methods
    from cleansweep.sweep import space as spaces

    m = MATRIX_METHODS[method]
    values = {  # the description is part of a sweep's recorded config: changing it would refuse `--resume`
        "description": f"study matrix: {method} cleaning of the {card['attack_spec']['name']}-poisoned demo model",
        "model": {"checkpoint": card["checkpoint"]}, "attack": dict(card["attack_spec"]),
        "data": {"train_csv": paths["clean_csv"], "eval_dir": paths["eval_dir"], "batch_size": 32,
                 "eval_batch_size": 512},
        "objective": {"threshold": 0.05}, "epochs": epochs, "eval_every": 1,
        "base": {**m["base"], "method.mmcl_weight": 1, "optim.warmup_steps": 8}, "space": m["space"],
        "search": {"algorithm": "optuna", "num_samples": num_samples, "max_concurrent": 2,
                   "n_startup_trials": num_samples},
        "scheduler": {"name": "none"}, "resources": {"cpu": 1}, "mlflow": {"tracking_uri": uri},
    }
    cfg = validate(SearchConfig, values, f"matrix {method}")
    spaces.check(cfg, f"matrix {method}", list_methods())
    return cfg


def run_cell(attack: str, method: str, card: Mapping[str, Any], paths: Mapping[str, str], workdir: Path, uri: str,
             *, epochs: int, num_samples: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Sweep one cell (or reuse its finished sweep); returns its best feasible evaluation (NaN when none)."""
    from cleansweep import tracking
    from cleansweep.sweep import driver
    from cleansweep.sweep import start as start_model

    name = f"matrix-{attack}-{method}"
    state = driver.sweep_state(uri, workdir, name)
    if state != "finished":
        cfg = cell_config(method, card, paths, uri, epochs=epochs, num_samples=num_samples)
        echo(f"[matrix] {attack} x {method}: sweep {name} ({state})")
        driver.search(cfg, start_model.resolve(cfg, workdir, echo=echo), name=name, workdir=workdir,
                      resume=state == "started", echo=lambda line: None)
    board = report.sweep_leaderboard(tracking.load_sweep(name, uri))
    best = board[board["feasible"]].head(1)
    top1, asr = (float(best.iloc[0][TOP1]), float(best.iloc[0][ASR])) if len(best) else (math.nan, math.nan)
    return {"attack": attack, "method": method, "sweep": name, "trials": len(board), TOP1: top1, ASR: asr}


# ------------------------------------------------------------------------------------------------ table
def matrix_table(cells: Sequence[Mapping[str, Any]], starts: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per attack: its poison fraction, the start (top-1, ASR) and per method the best feasible top-1."""
    frame = pd.DataFrame(cells)
    rows = []
    for attack, start in starts.items():
        row = {"attack": attack, "poison_fraction": start["fraction"], "start_top1": start[TOP1],
               "start_asr": start[ASR]}
        for cell in frame[frame["attack"] == attack].to_dict("records"):
            row[cell["method"]] = cell[TOP1]
            row[f"{cell['method']}_asr"] = cell[ASR]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_matrix(table: pd.DataFrame, methods: Sequence[str]) -> str:
    """The table for README: start top-1 / ASR, then per method 'best top-1 (its ASR)' or '-' (never feasible)."""
    def cell(top1: float, asr: float) -> str:
        return "-" if pd.isna(top1) else f"{100 * top1:.1f}% ({100 * asr:.1f}%)"

    shown = pd.DataFrame({"attack (poisons)": [f"{a} ({f:.0%})" for a, f in zip(table["attack"],
                                                                                 table["poison_fraction"],
                                                                                 strict=True)],
                          "start top-1 / ASR": [f"{100 * t:.1f}% / {100 * a:.1f}%" for t, a in
                                                zip(table["start_top1"], table["start_asr"], strict=True)]})
    for m in methods:
        if m in table:
            shown[m] = [cell(t, a) for t, a in zip(table[m], table[f"{m}_asr"], strict=True)]
    return shown.to_markdown(index=False)


# ------------------------------------------------------------------------------------------------ driver
def run_matrix(*, workdir: Path, attacks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               tracking_uri: str | None = None, pretrain_epochs: int | None = None, clean_epochs: int = CELL_EPOCHS,
               num_samples: int = CELL_TRIALS, address: str | None = None, max_tries: int = MAX_TRIES,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the attack x method study and write `<workdir>/study/matrix/`.

    Args:
        workdir: Holds data, models, sweeps, the default MLflow database and the study folder.
        attacks: Subset of `ATTACKS` (default all).
        methods: Subset of `MATRIX_METHODS` (default all).
        tracking_uri: MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in the workdir).
        pretrain_epochs: Override the demo's pre-training epochs.
        clean_epochs: Cleaning epochs per trial.
        num_samples: Trials per cell.
        max_tries: Poison fractions tried per attack before its model is used as it is.
        address: Ray cluster (default: a local Ray, started once for every sweep).
        echo: Where progress lines go.

    Returns:
        `{"out_dir", "table" (DataFrame), "calibration" (DataFrame), "cells" (list)}`.
    """
    from cleansweep import tracking
    from cleansweep.experiments import presets

    attacks, methods = list(attacks or ATTACKS), list(methods or MATRIX_METHODS)
    _check_names(attacks, methods)
    workdir = Path(workdir).resolve()
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    out = layout.study_dir(workdir, "matrix")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    paths = presets.prepare_demo_data(workdir)
    clean = None
    if "badclip" in attacks:  # BadCLIP optimises its patch on a clean model of the same world
        clean = Path(_pretrain("matrix-clean", paths["clean_train_csv"], {"name": "badnet", "target": TARGET},
                               paths, workdir, uri, pretrain_epochs)["checkpoint"])
    starts, calibration, cells = {}, [], []
    with cluster.connect(address, echo=echo):  # one Ray for every sweep (start-up costs seconds each)
        for attack in attacks:
            card, tries = calibrated_model(attack, paths, workdir, uri, clean_model=clean, epochs=pretrain_epochs,
                                           echo=echo, max_tries=max_tries)
            starts[attack], calibration = {**card, TOP1: card[TOP1], ASR: card[ASR]}, calibration + tries
            for method in methods:
                cells.append(run_cell(attack, method, card, paths, workdir, uri, epochs=clean_epochs,
                                      num_samples=num_samples, echo=echo))
            _write(out, cells, starts, calibration, methods, time.monotonic() - started)
    return _write(out, cells, starts, calibration, methods, time.monotonic() - started, complete=True)


def _write(out: Path, cells: list[dict[str, Any]], starts: Mapping[str, Mapping[str, Any]],
           calibration: list[dict[str, Any]], methods: Sequence[str], seconds: float, complete: bool = False
           ) -> dict[str, Any]:
    table = matrix_table(cells, starts)
    calib = pd.DataFrame(calibration)
    atomic.write_atomic(out / "matrix.csv", lambda p: table.to_csv(p, index=False))
    atomic.write_text(out / "matrix.md", markdown_matrix(table, methods) + "\n")
    atomic.write_atomic(out / "calibration.csv", lambda p: calib.to_csv(p, index=False))
    atomic.write_json(out / "matrix.json", {"complete": complete, "seconds": round(seconds, 1), "cells": cells,
                                            "calibration": calibration, "asr_taken": ASR_TAKEN})
    return {"out_dir": out, "table": table, "calibration": calib, "cells": cells}


