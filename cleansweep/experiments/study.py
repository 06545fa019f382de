"""The paper's experiment as one command: data -> poison -> pre-train x2 -> clean (sweep) x2 -> side-by-side report.

Pre-train one CLIP model with MMCL and one with MMCL+SSL on the same poisoned data (Ray Train), run the CleanCLIP
cleaning sweep on each (Ray Tune + Optuna, every evaluation in MLflow), and report them side by side: a Table 2
analogue (one row per pre-training objective: starting accuracy and ASR, best accuracy with ASR <= 5%, relative
change, how many trials end feasible) and a Figure 2 analogue (two Pareto panels).

As in the paper, the MMCL model is the most accurate evaluation of its run and the MMCL+SSL model is the evaluation
whose accuracy is closest to it (`selection: closest_top1`), so both start from similar accuracies.

Every stage is skipped when its result exists (a pre-trained model's `selected/model.json` card, a FINISHED sweep
in MLflow) and resumed when it was interrupted, so re-running after Ctrl-C continues where it stopped. Output:
`<workdir>/study/<PRESET>/` with `table2.csv/.md`, `figure2.png`, one report folder per objective and `study.json`
(stage timings, the resources of every stage under `scale`; `complete` is true only once everything is written).

Scale: `scale` (the CLI's `--workers`, `--gpus-per-worker`, `--cpus-per-worker`, `--loader-workers`,
`--trial-cpus`, `--trial-gpus`) overrides the preset's Ray Train workers of pre-training, the DataLoader workers of
every training process, and the CPUs/GPUs of each cleaning trial; `scale_plan` resolves them against the preset.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cleansweep.config import MlflowSpec, RaySpec, deep_update, read_yaml, validate
from cleansweep.errors import UserError
from cleansweep.pretrain import driver as pretrain_driver
from cleansweep.pretrain.selection import selected_card
from cleansweep.results import report
from cleansweep.runtime import atomic, cluster, layout
from cleansweep.sweep import driver as sweep_driver
from cleansweep.sweep.config import SearchConfig
from cleansweep.train_config import PretrainConfig, TrainSpec

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
PATH_HELP = {
    "train_csv": "the poisoned pre-training image-caption CSV (e.g. from `cleansweep poison --num-poison 1500`)",
    "clean_csv": "the clean cleaning set (100K image-caption pairs)",
    "eval_dir": "the ImageNet validation folder (one subfolder per class)",
}

# The demo world's cleaning space: the learning rates where CleanCLIP starts to remove the toy backdoor (the
# calibration in experiments/presets.py: at 3e-4 ASR stays 0.68, from ~1.3e-3 trials reach ASR <= 5%) and the SSL
# weights the paper sweeps.
_TOY_CLEAN: dict[str, Any] = {  # the budget and space of search_spaces/demo.yaml
    "epochs": 10, "eval_every": 1,
    "base": {"method.name": "contrastive", "method.mmcl_weight": 1, "optim.warmup_steps": 8},
    "space": {"optim.lr": {"loguniform": [2.0e-4, 3.0e-3]}, "method.ssl_weight": {"choice": [0.5, 1, 2]}},
    "search": {"algorithm": "optuna", "num_samples": 10, "max_concurrent": 2, "n_startup_trials": 4},
    "scheduler": {"name": "asha", "grace_period": 3, "reduction_factor": 3},
    "resources": {"cpu": 1},
}


STUDIES: dict[str, dict[str, Any]] = {
    "toy": {"preset": "demo",
            "description": "the built-in synthetic world; 2 pre-trainings + 2 sweeps, 26-36 min on 2 busy CPU cores",
            "clean": {"mmcl": _TOY_CLEAN, "mmcl+ssl": _TOY_CLEAN}, "ray": {"num_workers": 1, "cpus_per_worker": 1}},
    "cc3m": {"preset": "cc3m", "description": "the paper's CC3M setting (RN50, Appendix D.1/D.2 grids) on your data",
             "clean": {"mmcl": "paper_D01.yaml", "mmcl+ssl": "paper_D02.yaml"},
             "ray": {"num_workers": 1, "cpus_per_worker": 8, "use_gpu": True}},
    "cc6m": {"preset": "cc6m", "description": "the paper's CC6M setting (RN50, Appendix D.3/D.4 grids) on your data",
             "clean": {"mmcl": "paper_D03.yaml", "mmcl+ssl": "paper_D04.yaml"},
             "ray": {"num_workers": 1, "cpus_per_worker": 8, "use_gpu": True}},
}


def list_studies() -> list[str]:
    """Names of the study presets."""
    return list(STUDIES)


slug = layout.slug


def run_names(preset: str) -> dict[str, dict[str, str]]:
    """objective -> {"pretrain": run name, "sweep": sweep name} of a study preset."""
    return layout.study_run_names(preset, list(layout.OBJECTIVES))


# ------------------------------------------------------------------------------------------------ scale
def _clean_space(preset: str, objective: str) -> tuple[str, dict[str, Any]]:
    """(source, values) of the cleaning space of one objective: a study's own dict or a search_spaces/ file."""
    clean = STUDIES[preset]["clean"][objective]
    if not isinstance(clean, str):
        return f"study {preset} cleaning {objective}", copy.deepcopy(clean)
    source = SPACES_DIR / clean
    if not source.is_file():
        raise UserError(f"{source} not found; run the study from a cleansweep source checkout (search_spaces/)")
    return str(source), read_yaml(source)


def scale_plan(preset: str, scale: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resources of every stage of study `preset` (see `experiments.scale.plan`), as study.json records them.

    Raises:
        UserError: an unknown study, scale key, or a value outside its bounds (one line).
    """
    from cleansweep.experiments import scale as scaling

    if preset not in STUDIES:
        raise UserError(f"unknown study {preset!r}; choose from: {', '.join(STUDIES)}")
    spaces = {o: _clean_space(preset, o) for o in layout.OBJECTIVES}
    return scaling.plan(preset, STUDIES[preset]["preset"], STUDIES[preset]["ray"], spaces, scale)


# ------------------------------------------------------------------------------------------------ stages
def resolve_data(preset: str, workdir: Path, paths: Mapping[str, Any] | None, seed: int = 0) -> dict[str, str]:
    """The study's data: the demo world (built and poisoned when `paths` is empty) or the user's paths.

    Raises:
        UserError: a paper preset without all of train_csv, clean_csv, eval_dir (the message names every missing
            one and what it should hold), or a path that does not exist.
    """
    given = {k: str(v) for k, v in (paths or {}).items() if v}
    if not given and STUDIES[preset]["preset"] == "demo":
        from cleansweep.experiments import presets

        return presets.prepare_demo_data(workdir, seed=seed)
    missing = [k for k in PATH_HELP if k not in given]
    if missing:
        need = "; ".join(f"--{k.replace('_', '-')}: {PATH_HELP[k]}" for k in missing)
        raise UserError(f"study {preset!r} needs your data paths, missing {', '.join(missing)}: {need}")
    for key in PATH_HELP:
        if not Path(given[key]).exists():
            raise UserError(f"study {preset!r}: {key} {given[key]} does not exist; pass an existing path")
    return {k: str(Path(v).resolve()) for k, v in given.items()}


def pretrain_config(preset: str, objective: str, data: Mapping[str, str], *, name: str, tracking_uri: str | None,
                    reference_top1: float | None, overrides: Mapping[str, Any] | None = None,
                    scale: Mapping[str, Any] | None = None) -> PretrainConfig:
    """The pre-training run of one objective; MMCL+SSL selects the evaluation closest to `reference_top1`.

    Args:
        scale: Ray Train workers, GPUs/CPUs per worker and DataLoader workers (keys: `scale.SCALE_KEYS`).
    """
    from cleansweep.experiments import presets

    plan = dict(scale_plan(preset, scale)["pretrain"])
    loader = plan.pop("loader_workers")
    spec = presets.pretrain_spec(STUDIES[preset]["preset"], objective, dict(data),
                                 **{"data.workers": loader, **dict(overrides or {})})
    closest = objective != "mmcl" and reference_top1 is not None
    return PretrainConfig(
        name=name, train=validate(TrainSpec, spec, f"study {preset} pre-training {objective}"),
        ray=RaySpec(**plan), mlflow=MlflowSpec(tracking_uri=tracking_uri, experiment="cleansweep-pretrain"),
        selection="closest_top1" if closest else "best_top1", reference_top1=reference_top1 if closest else None)


def sweep_config(preset: str, objective: str, data: Mapping[str, str], checkpoint: str, *, tracking_uri: str | None,
                 overrides: Mapping[str, Any] | None = None, scale: Mapping[str, Any] | None = None) -> SearchConfig:
    """The CleanCLIP sweep of one pre-trained model: the preset's space on its clean set and evaluation folder.

    Args:
        overrides: Top-level SearchConfig keys, dotted (`epochs`, `search.num_samples`, `scheduler.grace_period`).
        scale: CPUs/GPUs per trial and DataLoader workers (keys: `scale.SCALE_KEYS`; see `scale_plan`).
    """
    from cleansweep.experiments import presets
    from cleansweep.methods import list_methods
    from cleansweep.sweep import space as spaces

    resources = dict(scale_plan(preset, scale)["clean"][objective])
    loader = resources.pop("loader_workers")
    source, clean = _clean_space(preset, objective)
    trial = presets.clean_spec(STUDIES[preset]["preset"], dict(data), checkpoint)
    # The preset's cleaning recipe (optimizer, loss weights) under the space's own base values.
    base = deep_update({"method": trial["method"], "optim": trial["optim"]}, clean.get("base") or {})
    values = deep_update(dict(clean), {
        "base": base,
        "description": f"{source}: CleanCLIP cleaning of the {layout.objective_label(objective)}-pretrained model",
        "model": {"checkpoint": checkpoint},
        "data": {**trial["data"], **{k: v for k, v in (clean.get("data") or {}).items()
                                     if k not in ("train_csv", "eval_dir")}, "workers": loader},
        "resources": resources, "attack": trial["attack"],
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "cleansweep"}})
    values["model"].pop("name", None)  # from the checkpoint's card
    values = deep_update(values, dict(overrides or {}))
    cfg = validate(SearchConfig, values, source)
    spaces.check(cfg, source, list_methods())
    return cfg


# ------------------------------------------------------------------------------------------------ tables
def table2(analyses: Mapping[str, Mapping[str, Any]], pretrained: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Table 2 of the paper, one row per pre-training objective, plus the stopping-criterion counts.

    Args:
        analyses: objective label -> `report.analyse(...)` of its sweep.
        pretrained: objective label -> the selected pre-trained model's card (`zeroshot_top1`, `asr_top1`, `epoch`).
    """
    rows = []
    for label, a in analyses.items():
        s, ss = a["summary"].iloc[0], a["stopping_summary"].iloc[0]
        card = pretrained.get(label, {})
        rows.append({"objective": label, "pretrain_epoch": card.get("epoch"),
                     "start_top1": s["start_top1"], "start_asr": s["start_asr"], "best_top1": s["best_top1"],
                     "best_asr": s["best_asr"], "best_epoch": s["best_epoch"],
                     "best_mid_trajectory": _best_is_mid_trajectory(a["stopping"], s["best_trial"]),
                     "relative_change": s["relative_change"], "trials": s["trials"],
                     "trials_feasible_anywhere": ss["trials_feasible_anywhere"],
                     "trials_feasible_at_end": ss["trials_feasible_at_end"],
                     "trials_best_mid_trajectory": ss["trials_best_mid_trajectory"], "sweep": s["sweep"]})
    return pd.DataFrame(rows)


def _best_is_mid_trajectory(stopping: pd.DataFrame, best_trial: str | None) -> bool | None:
    """Whether the best feasible evaluation of the sweep came before its trial's last one (None: no feasible one)."""
    if best_trial is None or stopping.empty:
        return None
    row = stopping[stopping["trial_id"] == best_trial]
    return bool(row.iloc[0]["best_is_mid_trajectory"]) if len(row) else None


# ------------------------------------------------------------------------------------------------ driver
class _Log:
    """study.json: written at the start and after every stage (atomically), `complete` only at the end."""

    def __init__(self, path: Path, preset: str, workdir: Path):
        self.path = path
        self.data: dict[str, Any] = {"preset": preset, "workdir": str(workdir), "complete": False, "stages": {}}

    def stage(self, name: str, seconds: float, skipped: bool, **info: Any) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 2), "skipped": skipped, **info}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path, self.data)


def run_study(preset: str, *, workdir: Path, paths: Mapping[str, Any] | None = None, tracking_uri: str | None = None,
              pretrain_overrides: Mapping[str, Any] | None = None, sweep_overrides: Mapping[str, Any] | None = None,
              seed: int = 0, address: str | None = None, scale: Mapping[str, Any] | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) study `preset` and write `<workdir>/study/<preset>/`.

    Args:
        preset: A name from `list_studies()`.
        workdir: Holds data, pre-trained models, sweeps, the default MLflow database and the study folder.
        paths: `train_csv` (poisoned), `clean_csv`, `eval_dir`; required for the paper presets, optional for `toy`
            (default: the built-in world, built and poisoned here).
        tracking_uri: MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in the workdir).
        pretrain_overrides: Dotted TrainSpec keys for both pre-training runs (e.g. `{"epochs": 2}`).
        sweep_overrides: Dotted SearchConfig keys for both sweeps (e.g. `{"search.num_samples": 2}`).
        seed: Seed of the demo world and its poisoning.
        address: Ray cluster to run on (default: a local Ray, started once for all stages).
        scale: Workers and resources (workers, gpus_per_worker, cpus_per_worker, loader_workers, trial_cpus,
            trial_gpus; None keeps the preset's); resolved by `scale_plan`, recorded in study.json.
        echo: Where progress lines go.

    Returns:
        `{"out_dir", "table2" (DataFrame), "figure_points" (label -> count), "files", "study"}` (study.json content).
    """
    from cleansweep import tracking

    plan = scale_plan(preset, scale)  # refuses an unknown study or a bad number before anything is built
    workdir = Path(workdir).resolve()
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    out = layout.study_dir(workdir, preset)
    log = _Log(out / "study.json", preset, workdir)
    log.data["scale"] = plan
    log.write()  # the resources asked for are on record even when the data are refused

    t = time.monotonic()
    data = resolve_data(preset, workdir, paths, seed)
    log.stage("data", time.monotonic() - t, skipped=False, paths=data)
    names = run_names(preset)
    pending = [o for o in layout.OBJECTIVES if selected_card(workdir, names[o]["pretrain"]) is None
               or sweep_driver.sweep_state(uri, workdir, names[o]["sweep"]) != "finished"]
    with cluster.connect(address, echo=echo) if pending else contextlib.nullcontext():
        # One Ray for all four stages (pre-training and sweeps reuse an initialised Ray): start-up costs seconds.
        return _train_clean_report(preset, workdir, uri, data, log, pretrain_overrides, sweep_overrides, scale, echo)


def _train_clean_report(preset: str, workdir: Path, uri: str, data: dict[str, str], log: _Log,
                        pretrain_overrides: Mapping[str, Any] | None, sweep_overrides: Mapping[str, Any] | None,
                        scale: Mapping[str, Any] | None, echo: Callable[[str], None]) -> dict[str, Any]:
    cards = _pretrain_stage(preset, workdir, uri, data, log, pretrain_overrides, scale, echo)
    _sweep_stage(preset, workdir, uri, data, log, cards, sweep_overrides, scale, echo)
    return _report_stage(preset, uri, log, cards)


def _pretrain_stage(preset: str, workdir: Path, uri: str, data: dict[str, str], log: _Log,
                    overrides: Mapping[str, Any] | None, scale: Mapping[str, Any] | None,
                    echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Pre-train (or find) one model per objective; MMCL+SSL is selected at MMCL's accuracy (the paper's rule)."""
    names, cards = run_names(preset), {}
    for objective in layout.OBJECTIVES:
        t, name = time.monotonic(), names[objective]["pretrain"]
        card = selected_card(workdir, name)
        skipped = card is not None
        if card is None:
            reference = cards["mmcl"]["zeroshot_top1"] if objective != "mmcl" else None
            cfg = pretrain_config(preset, objective, data, name=name, tracking_uri=uri, reference_top1=reference,
                                  overrides=overrides, scale=scale)
            echo(f"[study] pre-training {layout.objective_label(objective)} ({name})")
            pretrain_driver.pretrain(cfg, workdir=workdir, resume=layout.pretrain_dir(workdir, name).exists())
            card = selected_card(workdir, name)
        else:
            echo(f"[study] pre-trained {layout.objective_label(objective)} model found: {card['checkpoint']}")
        cards[objective] = card
        log.stage(f"pretrain {objective}", time.monotonic() - t, skipped=skipped,
                  run=name, checkpoint=card["checkpoint"], zeroshot_top1=card.get("zeroshot_top1"),
                  asr_top1=card.get("asr_top1"), epoch=card.get("epoch"))
    return cards


def _sweep_stage(preset: str, workdir: Path, uri: str, data: dict[str, str], log: _Log,
                 cards: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any] | None,
                 scale: Mapping[str, Any] | None, echo: Callable[[str], None]) -> None:
    """Run (or resume, or skip when finished) the CleanCLIP sweep of each pre-trained model."""
    from cleansweep.sweep import start as start_model

    for objective, names in run_names(preset).items():
        t, name = time.monotonic(), names["sweep"]
        state = sweep_driver.sweep_state(uri, workdir, name)
        if state != "finished":
            cfg = sweep_config(preset, objective, data, cards[objective]["checkpoint"], tracking_uri=uri,
                               overrides=overrides, scale=scale)
            echo(f"[study] cleaning sweep of the {layout.objective_label(objective)} model ({name}, {state})")
            start = start_model.resolve(cfg, workdir, echo=echo)
            sweep_driver.search(cfg, start, name=name, workdir=workdir, resume=state == "started", echo=echo)
        else:
            echo(f"[study] sweep {name} already finished")
        log.stage(f"sweep {objective}", time.monotonic() - t, skipped=state == "finished", sweep=name)


def _report_stage(preset: str, uri: str, log: _Log, cards: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One report per sweep, Table 2 and Figure 2 side by side; study.json marked complete."""
    from cleansweep import tracking

    t, out, names = time.monotonic(), log.path.parent, run_names(preset)
    analyses, panels, files = {}, {}, []
    for objective, label in ((o, layout.objective_label(o)) for o in layout.OBJECTIVES):
        sweep = tracking.load_sweep(names[objective]["sweep"], uri)
        rep = report.build_report(sweep, out / slug(objective))
        tracking.log_report_artifacts(sweep.parent_run_id, rep.out_dir, uri)
        analyses[label] = report.analyse(sweep)
        panels[label] = (rep.evaluations, rep.start)
        files += rep.files
    threshold = next(iter(analyses.values()))["threshold"]
    table = table2(analyses, {layout.objective_label(o): c for o, c in cards.items()})
    files += report.write_table(table, out, "table2")
    fig, counts = report.plot_study_pareto(panels, threshold, title=f"study {preset}: CleanCLIP cleaning of models "
                                           "pre-trained with MMCL vs MMCL+SSL (every evaluation)")
    files.append(report.write_figure(fig, out / "figure2.png"))
    log.stage("report", time.monotonic() - t, skipped=False, figure_points=counts)
    log.data.update(complete=True, table2=json.loads(table.to_json(orient="records")),
                    files=[str(f) for f in files])
    log.write()
    return {"out_dir": out, "table2": table, "figure_points": counts, "files": files, "study": log.data}
