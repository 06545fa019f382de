"""Command line: `cleansweep <command>`. The only place that exits.

`main(argv) -> int` is a plain function (tests call it in-process). Every expected problem surfaces as a
`UserError` and becomes one line on stderr with exit code 2; nothing here prints a traceback for bad input.
Each subcommand has an `_add_<name>(sub)` that declares its flags and a `_cmd_<name>(args)` that calls the library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from cleansweep import __version__, limits
from cleansweep.errors import DiskFull, UserError
from cleansweep.runtime import interrupts, layout


def default_workdir() -> Path:
    """Where presets cache data, models and sweeps: $CLEANSWEEP_WORKDIR or ./cleansweep-runs."""
    return Path(os.environ.get("CLEANSWEEP_WORKDIR", "cleansweep-runs")).resolve()


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code and the one-line message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _store(explicit: str | None, workdir: Path, *, must_exist: bool = False) -> str:
    """The tracking URI a command uses, refused here (one line, nothing written) when it cannot be used."""
    from cleansweep import tracking

    uri = tracking.resolve_tracking_uri(explicit, workdir)
    tracking.check_store(uri, workdir, must_exist=must_exist)
    return uri


def _print_json(obj: object) -> None:
    """Strict JSON on stdout: a NaN (an ASR with no non-target image) is written as null, not as invalid NaN."""

    def finite(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list | tuple) else value

    print(json.dumps(finite(obj), indent=2, default=str, allow_nan=False))


# ---------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="materialise datasets (the built-in demo world)")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    demo = dsub.add_parser("demo", help="write the synthetic demo world (train/clean CSV + eval folder)")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--seed", type=limits.seed, default=0)
    demo.add_argument("--n-train", type=limits.count, default=None, help="training pairs (default: the demo preset's)")
    demo.add_argument("--n-clean", type=limits.count, default=None, help="clean cleaning pairs")
    demo.add_argument("--n-eval", type=limits.count, default=None, help="evaluation images")
    demo.add_argument("--image-size", type=limits.int_in(8, limits.MAX_IMAGE_SIDE), default=None,
                      help="image side in pixels")
    demo.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                      help="difficulty knob (repeatable), e.g. --knob clutter=2 --knob noise=0.1; see world.json")
    demo.set_defaults(func=_cmd_data_demo)


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from cleansweep.data import make_demo_world

    knobs = {k: v for k, v in {"n_train": args.n_train, "n_clean": args.n_clean, "n_eval": args.n_eval,
                               "image_size": args.image_size}.items() if v is not None}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--knob {item!r} must look like NAME=VALUE, e.g. --knob clutter=2")
        try:
            knobs[name.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"--knob {item!r}: the value must be a number; e.g. --knob noise=0.1") from None
    info = make_demo_world(args.out, seed=args.seed, **knobs)
    _print_json(info)
    return 0


# -------------------------------------------------------------------------------------------------- poison
def _add_poison(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("poison", help="poison an image-caption CSV (or contaminate a clean set)")
    p.add_argument("--csv", type=Path, required=True, help="input image-caption CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder (CSV, images, manifest.json)")
    p.add_argument("--attack", default=None,
                   help="trigger: badnet (default), blended, sig, wanet, stripes, triangle, text, badclip (the default "
                        "with --optimise-on); parameters: cleansweep.attacks.triggers.TRIGGERS[name].defaults")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-poison", type=limits.count, help="number of rows to poison")
    g.add_argument("--fraction", type=limits.float_in(0, 1, low_open=True), help="fraction of rows to poison (0..1)")
    p.add_argument("--target", default="banana", help="target label written into poisoned captions")
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--image-size", type=limits.image_side, default=None,
                   help="resize to this before the trigger: the model resolution (default 224, or the --optimise-on "
                        "model's)")
    p.add_argument("--label-consistent", action="store_true", help="trigger only rows whose caption names the target")
    p.add_argument("--contaminate", action="store_true",
                   help="add N poisoned copies of rows to a clean cleaning set instead of replacing rows")
    p.add_argument("--patch-size", type=limits.image_side, default=None,
                   help="patch / triangle side (default: the trigger's, e.g. BadNet 16 at 224 px, scaled)")
    p.add_argument("--location", choices=["random", "fixed"], default="random",
                   help="patch, triangle or text position: random or bottom-right")
    p.add_argument("--patch", choices=["fresh", "fixed"], default="fresh", help="BadNet patch: per image or per run")
    p.add_argument("--trigger-seed", type=limits.seed, default=0,
                   help="seed of the trigger's per-run parts (fixed patch, noise, warp, colours, stripe phase)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any trigger parameter (repeatable; YAML values), e.g. --param alpha=0.3 --param colour=red")
    p.add_argument("--image-key", default="image", help="CSV image column")
    p.add_argument("--caption-key", default="caption", help="CSV caption column")
    o = p.add_argument_group("badclip", "optimise the BadCLIP patch on a model first (it is kept in --out)")
    o.add_argument("--optimise-on", type=Path, metavar="CKPT", help="checkpoint (.safetensors/.pt) to optimise on")
    o.add_argument("--optimise-steps", type=limits.steps, default=200, help="optimisation steps")
    o.add_argument("--optimise-images", type=Path, metavar="DIR_or_CSV",
                   help="eval folder or image-caption CSV to optimise on (default: --csv)")
    o.add_argument("--optimise-model", default=None, help="model config of the checkpoint (default: its card's)")
    o.add_argument("--optimise-device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_poison)


def _cmd_poison(args: argparse.Namespace) -> int:
    from cleansweep.attacks import poison

    attack = args.attack or ("badclip" if args.optimise_on else "badnet")
    params = {"patch_size": args.patch_size, "location": args.location, "patch": args.patch,
              "trigger_seed": args.trigger_seed}
    params.update(poison.parse_trigger_param(item) for item in args.param)
    if isinstance(params.get("pattern"), str):
        params["pattern"] = str(Path(params["pattern"]).resolve())  # manifests are read from other CWDs (Ray)
    common = {"target": args.target, "num_poison": args.num_poison, "fraction": args.fraction, "seed": args.seed,
              "label_consistent": args.label_consistent, "image_key": args.image_key, "caption_key": args.caption_key}
    if args.optimise_on:
        from cleansweep.attacks.badclip import poison_with_optimised_patch

        if attack != "badclip" or "pattern" in params:
            raise UserError("--optimise-on makes the badclip patch itself; drop --attack and --param pattern")
        optimise = {"steps": args.optimise_steps, "model_name": args.optimise_model, "device": args.optimise_device}
        manifest = poison_with_optimised_patch(
            args.csv, args.out.resolve(), checkpoint=args.optimise_on, images=args.optimise_images,
            contaminate_set=args.contaminate, image_size=args.image_size, patch_size=params.pop("patch_size"),
            location=params.pop("location"), optimise=optimise, **common, **params)
    else:
        fn = poison.contaminate if args.contaminate else poison.poison_csv
        manifest = fn(args.csv, args.out, attack=attack, image_size=args.image_size or 224, **common, **params)
    summary = {k: v for k, v in manifest.items() if k != "poisoned_rows"}
    summary["num_poisoned"] = len(manifest.get("poisoned_rows", []))
    _print_json(summary)
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot accuracy and attack success rate of a checkpoint (JSON)")
    p.add_argument("checkpoint", type=Path, help=".safetensors or .pt checkpoint (never unpickled as code)")
    p.add_argument("--eval-data", type=Path, required=True, help="ImageNet-style folder (one subfolder per class)")
    p.add_argument("--model", default=None, help="model config name (default: from the checkpoint's card)")
    t = p.add_argument_group("trigger", "default: the trigger the checkpoint's card records, or --poison-manifest's; "
                             "a flag given overrides that one setting")
    t.add_argument("--poison-manifest", type=Path, default=None,
                   help="manifest.json (or its folder) from `cleansweep poison` of the model's training data")
    t.add_argument("--attack", default=None, help="trigger name (cleansweep.attacks.triggers.TRIGGERS)")
    t.add_argument("--target", default=None, help="target class of the backdoor (e.g. banana)")
    t.add_argument("--patch-size", type=limits.image_side, default=None)
    t.add_argument("--location", choices=["random", "fixed"], default=None)
    t.add_argument("--patch", choices=["fresh", "fixed"], default=None)
    t.add_argument("--trigger-seed", type=limits.seed, default=None, help="seed of the trigger's per-run parts")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other trigger parameter (repeatable), e.g. --param alpha=0.2")
    p.add_argument("--subset", type=limits.count, default=None, help="evaluate a fixed seeded subset of N images")
    p.add_argument("--batch-size", type=limits.batch, default=256)
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cleansweep.attacks.triggers import parse_trigger_param
    from cleansweep.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.eval_data, model_name=args.model, attack=args.attack,
                                  target=args.target, patch_size=args.patch_size, location=args.location,
                                  patch=args.patch, trigger_seed=args.trigger_seed,
                                  params=dict(parse_trigger_param(item) for item in args.param),
                                  manifest=args.poison_manifest, subset=args.subset, batch_size=args.batch_size,
                                  seed=args.seed, device=args.device)
    _print_json(metrics)
    return 0


# ---------------------------------------------------------------------------------------------------- scan
def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="is this model backdoored? trigger inversion without knowing the trigger (JSON + "
                       "PNG)")
    p.add_argument("checkpoint", type=Path, help=".safetensors or .pt checkpoint (never unpickled as code)")
    p.add_argument("--eval-data", type=Path, required=True, help="ImageNet-style folder of clean images")
    p.add_argument("--reference", type=Path, default=None, help="a clean model to compare with (same inversion)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <workdir>/scans/<checkpoint>)")
    p.add_argument("--model", default=None, help="model config name (default: from the checkpoint's card)")
    p.add_argument("--reference-model", default=None, help="model config of --reference (default: its card's)")
    p.add_argument("--subset", type=limits.int_in(0, limits.MAX_COUNT), default=500,
                   help="clean images used (a seeded subset; 0 = all)")
    p.add_argument("--steps", type=limits.steps, default=300, help="optimisation steps of the mask and pattern")
    p.add_argument("--seed", type=limits.seed, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workdir", type=Path, default=None, help="default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs")
    p.set_defaults(func=_cmd_scan)


def _cmd_scan(args: argparse.Namespace) -> int:
    from cleansweep.detect.scan import scan_checkpoint

    out = args.out or (args.workdir or default_workdir()).resolve() / "scans" / args.checkpoint.stem
    result = scan_checkpoint(args.checkpoint, args.eval_data, out_dir=out, reference=args.reference,
                             model_name=args.model, reference_model=args.reference_model,
                             subset=args.subset or None, steps=args.steps, seed=args.seed, device=args.device)
    _print_json(result)
    return 0


# ------------------------------------------------------------------------------------------------ pretrain
# Flag -> dotted key in PretrainConfig (flags override the YAML, which overrides the preset).
_PRETRAIN_FLAGS = {
    "name": "name", "model": "train.model.name", "init": "train.model.init", "train_csv": "train.data.train_csv",
    "eval_data": "train.data.eval_dir", "attack": "train.attack.name", "target": "train.attack.target",
    "epochs": "train.epochs", "batch_size": "train.data.batch_size", "lr": "train.optim.lr",
    "warmup_steps": "train.optim.warmup_steps", "eval_every": "train.eval_every", "seed": "train.seed",
    "num_workers": "ray.num_workers", "use_gpu": "ray.use_gpu", "cpus_per_worker": "ray.cpus_per_worker",
    "address": "ray.address", "selection": "selection", "reference_top1": "reference_top1",
}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train CLIP on (poisoned) data with Ray Train, logging to MLflow")
    p.add_argument("config", nargs="?", type=Path, help="PretrainConfig YAML (flags override it)")
    p.add_argument("--preset", help="demo: build + poison the synthetic world if absent, then train; cc3m, cc6m: the "
                   "paper's settings on your --train-csv/--eval-data")
    p.add_argument("--objective", choices=sorted(layout.OBJECTIVES), help="pre-training loss: mmcl or mmcl+ssl")
    p.add_argument("--name", help="run name: folder <workdir>/pretrain/NAME and the MLflow run name")
    p.add_argument("--model", help="model config name (cleansweep.models.list_models())")
    p.add_argument("--train-csv", type=Path, help="image-caption CSV to train on")
    p.add_argument("--eval-data", type=Path, help="ImageNet-style evaluation folder")
    p.add_argument("--attack", help="trigger for the ASR evaluation: badnet, blended, sig, wanet")
    p.add_argument("--target", help="target class name of the backdoor")
    p.add_argument("--init", type=Path, help="checkpoint to start from (.safetensors or .pt)")
    # 0 epochs would "pre-train" nothing and select the untrained model: `cleansweep evaluate` measures a model.
    p.add_argument("--epochs", type=limits.int_in(1, limits.MAX_STEPS, " (to measure a model without training: "
                                                 "cleansweep evaluate CKPT)"))
    p.add_argument("--batch-size", type=limits.int_in(2, limits.MAX_BATCH),
                   help="global batch size (split across workers)")
    p.add_argument("--lr", type=limits.float_in(0, low_open=True))
    p.add_argument("--warmup-steps", type=limits.int_in(0, limits.MAX_COUNT))
    p.add_argument("--eval-every", type=limits.float_in(0, limits.MAX_STEPS, low_open=True),
                   help="evaluate every this many epochs (1/3 = the short paper)")
    p.add_argument("--seed", type=limits.seed)
    p.add_argument("--num-workers", type=limits.int_in(0, limits.MAX_WORKERS),
                   help="Ray Train workers (0 = run in this process)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=limits.float_in(0, limits.MAX_WORKERS, low_open=True))
    p.add_argument("--address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--selection", choices=["best_top1", "closest_top1", "last"],
                   help="checkpoint handed to cleaning: best accuracy, accuracy closest to --reference-top1, last")
    p.add_argument("--reference-top1", type=limits.fraction, help="target accuracy for --selection closest_top1")
    p.add_argument("--resume", action="store_true", help="continue run NAME from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set train.optim.weight_decay=0.2 (repeatable; YAML values)")
    p.add_argument("--workdir", type=Path, default=None, help="default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs")
    p.set_defaults(func=_cmd_pretrain)


def _parse_sets(items: list[str]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not KEY=VALUE; write e.g. --set train.optim.lr=0.001")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


def _nest(flat: dict[str, object]) -> dict[str, object]:
    """{'train.optim.lr': 1} -> {'train': {'optim': {'lr': 1}}} (deep_update expands one level only)."""
    out: dict[str, object] = {}
    for key, value in flat.items():
        *heads, last = key.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})  # type: ignore[assignment]
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {head} is set both as a value and as a section; set one of them")
        node[last] = value
    return out


def _pretrain_config(args: argparse.Namespace, workdir: Path):  # noqa: ANN202 - PretrainConfig, imported lazily
    if args.preset == "demo":
        # Every flag, --set and YAML key is checked on the demo data's future paths first: a refusal writes nothing.
        dirs = layout.demo_data_dirs(workdir)
        _pretrain_config_on(args, {"train_csv": str(dirs["poisoned"] / "train.csv"), "eval_dir": str(dirs["world"])},
                            check_paths=False)
        from cleansweep.experiments import presets

        return _pretrain_config_on(args, presets.prepare_demo_data(workdir, seed=args.seed or 0))
    return _pretrain_config_on(args, {"train_csv": args.train_csv, "eval_dir": args.eval_data, "init": args.init})


def _pretrain_config_on(args: argparse.Namespace, paths: dict, *, check_paths: bool = True):  # noqa: ANN202
    from cleansweep.config import PretrainConfig, deep_update, read_yaml, validate

    data: dict = {}
    if args.preset:
        from cleansweep.experiments import presets

        presets.get_preset(args.preset)  # unknown name -> one-line error
        objective = args.objective or "mmcl"
        data = {"name": layout.preset_run_name(args.preset, objective),
                "train": presets.pretrain_spec(args.preset, objective, paths, check_paths=check_paths)}
    if args.config is not None:
        data = deep_update(data, read_yaml(args.config))
    flags = {key: getattr(args, attr) for attr, key in _PRETRAIN_FLAGS.items() if getattr(args, attr) is not None}
    if args.objective:
        flags |= {f"train.method.{k}": v for k, v in layout.objective_weights(args.objective).items()}
    data = deep_update(data, _nest({k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}))
    data = deep_update(data, _nest(_parse_sets(args.set)))
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    tdata = train.get("data") if isinstance(train.get("data"), dict) else {}
    for key, hint in (("train_csv", "--train-csv CSV"), ("eval_dir", "--eval-data FOLDER")):
        if key not in tdata:
            raise UserError(f"no train.data.{key} given; pass {hint}, a CONFIG.yaml that sets it, or --preset demo")
    if "name" not in data:
        raise UserError("no run name given; pass --name NAME (or set name: in the YAML)")
    return validate(PretrainConfig, data, str(args.config) if args.config else "pretrain flags")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    workdir = (args.workdir or default_workdir()).resolve()
    cfg = _pretrain_config(args, workdir)
    _store(cfg.mlflow.tracking_uri, workdir)
    from cleansweep.pretrain.driver import pretrain

    summary = pretrain(cfg, workdir=workdir, resume=args.resume)
    asr = summary.get("asr_top1")
    print(f"selected checkpoint: {summary['selected']}")
    print(f"  step {summary['step']:.0f} (epoch {summary['epoch']:.2f}), zeroshot_top1 {summary['zeroshot_top1']:.4f}, "
          f"asr_top1 {'n/a' if asr is None else f'{asr:.4f}'}, {summary['minutes']:.1f} min; "
          f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")
    return 0


# -------------------------------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Pareto plot, trajectories, Table 2 and stopping analysis of a sweep (MLflow)")
    p.add_argument("name", help="sweep name (the parent run's cleansweep.sweep tag)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <workdir>/reports/NAME)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment holding the sweep (default: all)")
    p.add_argument("--threshold", type=limits.fraction, default=None,
                   help="ASR threshold of a successful cleaning, 0..1 (default: the sweep's own, else 0.05)")
    p.add_argument("--no-log", action="store_true", help="do not upload the files to the sweep's parent run")
    p.add_argument("--workdir", type=Path, default=None, help="default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from cleansweep.results import report

    workdir = (args.workdir or default_workdir()).resolve()
    uri = _store(args.tracking_uri, workdir, must_exist=True)
    out = args.out or layout.report_dir(workdir, args.name)
    result = report.report_sweep(args.name, tracking_uri=uri, experiment=args.experiment, out_dir=out,
                                 threshold=args.threshold, log_artifacts=not args.no_log)
    ss = result.stopping_summary.iloc[0]
    print(report.markdown_table(result.summary))
    print(f"\nstopping: {ss['trials_feasible_at_end']} of {ss['trials']} trials end feasible, "
          f"{ss['trials_feasible_anywhere']} are feasible somewhere, {ss['trials_best_mid_trajectory']} have their "
          "best feasible model mid-trajectory")
    logged = "" if args.no_log else " (also logged under report/ on the sweep's parent run)"
    print(f"wrote {len(result.files)} files to {result.out_dir}{logged}")
    return 0


# ------------------------------------------------------------------------------------------------------ ui
def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI on the store the sweeps use (Ctrl-C to stop)")
    p.add_argument("--port", type=limits.port, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback: MLflow has no login, so tunnel rather than expose it)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", type=Path, default=None, help="default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs")
    p.set_defaults(func=_cmd_ui)


def mlflow_ui_command(tracking_uri: str, *, host: str, port: int) -> list[str]:
    """The `mlflow server` command line that serves the UI for the store at `tracking_uri`.

    Artifacts of experiments created from the UI land beside a sqlite file, where `cleansweep.tracking` puts them.
    """
    if tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking URI {tracking_uri} is already an MLflow server; open it in a browser "
                        "(or pass --tracking-uri sqlite:///PATH.db to serve a local store)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"no MLflow database at {db}; run a sweep first, or pass --tracking-uri / set "
                            "CLEANSWEEP_WORKDIR to the folder holding mlflow.db")
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def _wait_for_server(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> bool:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _cmd_ui(args: argparse.Namespace) -> int:
    import socket

    from cleansweep import tracking

    workdir = (args.workdir or default_workdir()).resolve()
    uri = tracking.resolve_tracking_uri(args.tracking_uri, workdir)
    cmd = mlflow_ui_command(uri, host=args.host, port=args.port)
    tracking.check_store(uri, workdir, must_exist=True)
    try:
        with socket.socket() as s:
            in_use = s.connect_ex((args.host if args.host != "0.0.0.0" else "127.0.0.1", args.port)) == 0
    except OSError as e:  # an unknown --host name
        raise UserError(f"--host {args.host}: {e.strerror or type(e).__name__}; pass an address to bind, e.g. "
                        "127.0.0.1") from None
    if in_use:
        raise UserError(f"port {args.port} on {args.host} is already in use; pass --port with a free port")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: MLflow has no login; anyone who reaches port {args.port} can read "
              "and delete runs. Prefer the default 127.0.0.1 and an SSH tunnel.", file=sys.stderr)
    url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    # MLflow's job runner (GenAI judges/scorers) starts ~8 worker processes we never use; the user's setting wins.
    proc = subprocess.Popen(cmd, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    try:
        if not _wait_for_server(proc, url):
            proc.terminate()
            proc.wait(timeout=30)
            raise UserError(f"mlflow server did not start (exit code {proc.returncode}); see its output above")
        print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -------------------------------------------------------------------------------------------------- search
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="cleaning sweep on Ray Tune + Optuna: max zero-shot top-1 s.t. ASR <= threshold")
    p.add_argument("space", type=Path, help="search-space YAML (see search_spaces/)")
    p.add_argument("--name", default=None, help="sweep name (default: the YAML's name, else its file stem)")
    p.add_argument("--storage-path", type=Path, default=None, help="Tune storage folder (default: <workdir>/sweeps)")
    p.add_argument("--num-samples", type=limits.count, default=None, help="trials (optuna/random) or grid repeats")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep of this --name")
    p.add_argument("--workdir", type=Path, default=None, help="cache, sweeps and MLflow database (default: "
                   "$CLEANSWEEP_WORKDIR or ./cleansweep-runs)")
    p.add_argument("--top-k", type=limits.count, default=10, help="rows of the leaderboard printed at the end")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from cleansweep.methods import list_methods
    from cleansweep.sweep import space as spaces

    cfg = spaces.load(args.space, known_methods=list_methods())
    if args.num_samples is not None:  # grid repeats count toward search.max_grid_points too
        search_spec = cfg.search.model_copy(update={"num_samples": args.num_samples})
        spaces.check_grid_size(cfg.model_copy(update={"search": search_spec}), f"{args.space} with --num-samples")
    from cleansweep.config import check_name

    name = args.name or cfg.name or args.space.stem
    try:
        check_name(name)
    except ValueError as e:
        raise UserError(f"--name: {e}") from None
    from cleansweep.results import report
    from cleansweep.sweep import delivery, driver
    from cleansweep.sweep import start as start_model

    workdir = (args.workdir or default_workdir()).resolve()
    # Everything that can be refused is refused here, before a model is pre-trained or Ray starts.
    driver.check_name(driver.sweep_location(cfg, name, workdir, args.storage_path), name, resume=args.resume)
    _store(cfg.mlflow.tracking_uri, workdir)
    start = start_model.resolve(cfg, workdir)
    out = driver.search(cfg, start, name=name, workdir=workdir, space_file=args.space,
                        storage_path=args.storage_path, num_samples=args.num_samples, address=args.address,
                        resume=args.resume)
    print(report.format_leaderboard(out["leaderboard"], "table", args.top_k))
    registered = f"; best model registered as {out['best_model']['name']} v{out['best_model']['version']}" \
        if out.get("best_model") else ""
    print(f"sweep {name}: {len(out['leaderboard'])} trials in {out['seconds'] / 60:.1f} min; {out['sweep_dir']}; "
          f"MLflow parent run {out['parent_run_id']} at {out['tracking_uri']}{registered}")
    if out.get("best_model_problem"):  # the sweep ran but cannot hand over its answer: never exit 0 (delivery.py)
        print(f"error: {out['best_model_problem']}; nothing was registered", file=sys.stderr)
        return delivery.EXIT_BEST_MODEL_LOST
    return 0


# ------------------------------------------------------------------------------------------------- results
def _add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="leaderboard of a sweep from MLflow: best feasible trial and the top-k")
    p.add_argument("name", help="sweep name")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--top-k", type=limits.count, default=10, help="rows to show")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment holding the sweep (default: all)")
    p.add_argument("--workdir", type=Path, default=None, help="where the default MLflow database lives")
    p.set_defaults(func=_cmd_results)


def _cmd_results(args: argparse.Namespace) -> int:
    from cleansweep.results import report

    uri = _store(args.tracking_uri, (args.workdir or default_workdir()).resolve(), must_exist=True)
    board = report.results(args.name, tracking_uri=uri, experiment=args.experiment)
    print(report.format_leaderboard(board, args.format, args.top_k))
    return 0


# --------------------------------------------------------------------------------------------------- study
def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="the paper's experiment (poison, pre-train MMCL and MMCL+SSL, clean both, "
                       "compare), or the attack x method matrix")
    p.add_argument("preset", help="toy (built-in world, CPU), cc3m or cc6m (the paper's settings on your data), or "
                   "matrix (every attack x every cleaning method on the built-in world)")
    p.add_argument("--workdir", type=Path, default=None, help="default: $CLEANSWEEP_WORKDIR or ./cleansweep-runs")
    p.add_argument("--train-csv", type=Path, default=None, help="poisoned pre-training image-caption CSV (cc3m/cc6m)")
    p.add_argument("--clean-csv", type=Path, default=None, help="clean cleaning image-caption CSV (cc3m/cc6m)")
    p.add_argument("--eval-dir", type=Path, default=None, help="ImageNet-style validation folder (cc3m/cc6m)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--pretrain-epochs", type=limits.steps, default=None,
                   help="override the preset's pre-training epochs")
    p.add_argument("--clean-epochs", type=limits.steps, default=None, help="override the cleaning epochs per trial")
    p.add_argument("--num-samples", type=limits.count, default=None,
                   help="override the trials per sweep (grid: repeats)")
    p.add_argument("--seed", type=limits.seed, default=0, help="seed of the built-in world and its poisoning")
    p.add_argument("--attacks", default=None, help="matrix: comma-separated subset of the attacks (default all)")
    p.add_argument("--methods", default=None, help="matrix: comma-separated subset of the methods (default all)")
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from cleansweep.experiments.study import run_study
    from cleansweep.results import report

    _store(args.tracking_uri, (args.workdir or default_workdir()).resolve())
    if args.preset == "matrix":
        return _cmd_matrix(args)
    if args.attacks or args.methods:
        raise UserError("--attacks / --methods belong to `cleansweep study matrix`; drop them for this study")
    paths = {"train_csv": args.train_csv, "clean_csv": args.clean_csv, "eval_dir": args.eval_dir}
    pre = {"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}
    sweep = {k: v for k, v in {"epochs": args.clean_epochs, "search.num_samples": args.num_samples}.items() if v}
    result = run_study(args.preset, workdir=(args.workdir or default_workdir()).resolve(),
                       paths={k: v for k, v in paths.items() if v}, tracking_uri=args.tracking_uri,
                       pretrain_overrides=pre, sweep_overrides=sweep, seed=args.seed, address=args.address)
    print(report.markdown_table(result["table2"]))
    print(f"\nwrote {result['out_dir']}: table2.csv/.md, figure2.png, study.json, one report per objective")
    return 0


def _cmd_matrix(args: argparse.Namespace) -> int:
    from cleansweep.experiments.matrix import METHODS, markdown_matrix, run_matrix

    def names(text: str | None) -> list[str] | None:
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    kwargs = {k: v for k, v in {"clean_epochs": args.clean_epochs, "num_samples": args.num_samples}.items() if v}
    result = run_matrix(workdir=(args.workdir or default_workdir()).resolve(), attacks=names(args.attacks),
                        methods=names(args.methods), tracking_uri=args.tracking_uri,
                        pretrain_epochs=args.pretrain_epochs, address=args.address, **kwargs)
    print(markdown_matrix(result["table"], names(args.methods) or list(METHODS)))
    print(f"\nwrote {result['out_dir']}: matrix.csv/.md, calibration.csv, matrix.json")
    return 0


# ---------------------------------------------------------------------------------------------------- main
_ADDERS = [_add_data, _add_poison, _add_evaluate, _add_scan, _add_pretrain, _add_search, _add_results, _add_report,
           _add_study, _add_ui]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleansweep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cleansweep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (0 ok, 2 user error, 75 disk full, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DiskFull, Exception) as e:  # a full disk: one line naming the path (diskguard), resumable
        from cleansweep.runtime import diskguard

        if (line := diskguard.disk_full_line(e)) is None:
            raise
        print(line, file=sys.stderr)
        return diskguard.EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: everything reported so far is saved; re-run with --resume to continue", file=sys.stderr)
        return 130


def entrypoint() -> None:
    with interrupts.sigterm_as_sigint():
        code = main()
    sys.exit(code)
