"""Reliability: kill -9 of the sweep driver then `--resume`, diverging trials isolated, bad inputs refused cleanly.

Everything runs `cleansweep ...` as a user does (a subprocess, `python -m cleansweep`) and counts from what the
sweep leaves behind: the MLflow store, Tune's trial folders and searcher state, the printed leaderboard.

1. kill: `cleansweep search` on a tiny backdoored model (tiny-rn, 32 px, cached in the workdir), its process group
   killed with SIGKILL at five moments picked from observable events: (1) Ray is up and the driver evaluates the
   starting model, no trial yet; (2) the first trial's MLflow run exists, nothing reported; (3) a running trial has
   reported half its evaluations; (4) a trial's run just turned FINISHED; (5) the last trial's run exists. Then
   `--resume` to the end. Counted per point (all should be 0): completed trials lost (finished before the kill and
   then missing, or run again: more evaluations, another run, a new end time, more lines in Tune's result.json),
   duplicate MLflow runs (more than one run per trial id), RUNNING leftovers (MLflow runs and Optuna trials),
   steps logged twice (any metric, any run), and whether `cleansweep results NAME --format json` and Tune's
   leaderboard.csv equal a recomputation from the raw MLflow histories.
2. nan: a sweep where some trials diverge (shrink-and-perturb with perturb 1e30): FAILED in MLflow and FAIL in
   Optuna's study for exactly those, the others FINISHED / COMPLETE with finite results, exit code 0.
3. inputs: >= 40 bad inputs (YAML, flags, CSV rows, images, checkpoints, poison outputs, eval folders, names, resume
   of unknown or changed sweeps). Each must exit 2 with exactly one stderr line `error: <problem>; <fix>`, no
   traceback, and leave a finished sweep (its folder and MLflow database), a poisoned output folder and the data it
   came from byte-identical (sha256 of every file before and after). A malicious pickle must not run.

    python benchmarks/reliability.py [--part kill|nan|inputs|all] [--workdir DIR] [--trials 4] [--epochs 2]
        [--clean-rows 480] [--points 1,2,3,4,5]

Tables are printed as Markdown; the numbers also go to WORKDIR/reliability-<part>.json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

TOP1, ASR = "zeroshot_top1", "asr_top1"
CLI = [sys.executable, "-m", "cleansweep"]
PATCH = 8  # a fixed 8 px BadNet patch in a fixed corner: the tiny model takes it in a few epochs (tests/test_search)
POLL_S = 0.25  # how often the kill part looks at the store while waiting for its event


# ------------------------------------------------------------------------------------------------ shared
def bench_env(root: Path) -> dict[str, str]:
    """The environment of every `cleansweep` subprocess: a private HOME (Ray writes its auth token to ~/.ray), no
    inherited cluster address or tracking URI, unbuffered output (the kill part reads the driver's lines)."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    drop = {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "CLEANSWEEP_WORKDIR", "TUNE_GLOBAL_CHECKPOINT_S"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", RAY_DISABLE_IMPORT_WARNING="1")
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`cleansweep ARGS` in a subprocess; stdout and stderr captured as text."""
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (cells with '|' escaped, newlines flattened)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tree_digest(roots: list[Path]) -> dict[str, str]:
    """sha256 of every file under `roots` (relative path -> digest); a folder's absence is recorded too."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[str(path)] = digest.hexdigest()
    return out


def digest_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files changed, removed or added between two `tree_digest`s, as short labels."""
    changed = [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    removed = [f"removed {p}" for p in before if p not in after]
    added = [f"added {p}" for p in after if p not in before]
    return changed + removed + added


def write_space(path: Path, world: dict, checkpoint: Path, extra: str) -> Path:
    """A search-space YAML on the tiny world (the shape of tests/test_search.py's `_space_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f"""
        model: {{checkpoint: {checkpoint}, name: tiny-rn}}
        data: {{train_csv: {world['clean_csv']}, eval_dir: {world['eval_dir']}, batch_size: 16,
                eval_batch_size: 64}}
        attack: {{patch_size: {PATCH}, location: fixed, patch: fixed}}
        """) + textwrap.dedent(extra))
    return path


def poisoned_model(root: Path, clean_rows: int) -> dict[str, Any]:
    """A tiny world and a backdoored tiny-rn trained on it, as tests/test_search.py's `tiny_checkpoint` (512 pairs,
    20% fixed 8 px BadNet, 6 epochs, the evaluation with the highest ASR kept); cached in root/tiny-<clean_rows>."""
    out = root / f"tiny-{clean_rows}"
    record = out / "model-record.json"
    if record.is_file():
        return json.loads(record.read_text())
    from cleansweep import session
    from cleansweep.data import make_demo_world
    from cleansweep.poison import poison_csv

    world = make_demo_world(out / "world", seed=0, n_train=512, n_clean=clean_rows, n_eval=36, image_size=32,
                            num_classes=6)
    manifest = poison_csv(world["train_csv"], out / "poisoned", attack="badnet", target="banana", fraction=0.2,
                          seed=0, image_size=32, patch_size=PATCH, location="fixed", patch="fixed")
    spec = {"model": {"name": "tiny-rn"}, "epochs": 6, "device": "cpu", "seed": 0,
            "attack": {"patch_size": PATCH, "location": "fixed", "patch": "fixed"},
            "data": {"train_csv": str(out / "poisoned" / manifest["output_csv"]), "eval_dir": world["eval_dir"],
                     "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    kept: dict[str, float] = {}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None and metrics[ASR] > kept.get(ASR, -1.0):
            shutil.copytree(checkpoint_dir, out / "model", dirs_exist_ok=True)
            kept.update({TOP1: float(metrics[TOP1]), ASR: float(metrics[ASR])})

    session.fit(spec, report)
    info = {"world": {k: str(world[k]) for k in ("clean_csv", "eval_dir", "train_csv")},
            "checkpoint": str(out / "model" / "model.safetensors"), "metrics": kept}
    record.write_text(json.dumps(info, indent=2))
    return info


def threshold_for(model: dict[str, Any]) -> float:
    """Below the starting model's ASR, so the start is infeasible and cleaning has to lower the ASR."""
    start = float(model["metrics"][ASR])
    if start < 0.3:
        raise SystemExit(f"the tiny model did not take the backdoor (ASR {start}); recalibrate its pre-training")
    return round(0.6 * start, 3)


# ------------------------------------------------------------------------------------------------ MLflow reads
def mlflow_client(workdir: Path) -> Any | None:
    """A client on the sweep's sqlite store, or None while the driver has not created it yet."""
    from cleansweep import tracking

    if not (workdir / "mlflow.db").is_file():
        return None
    return tracking.open_client(tracking.resolve_tracking_uri(None, workdir, env={}))


def sweep_runs(client: Any, name: str) -> list[Any]:
    """Every MLflow run of sweep `name` (its parent and all trial runs, lost ones included)."""
    exp = client.get_experiment_by_name("cleansweep")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`cleansweep.sweep` = '{name}'",
                              max_results=10_000)


def is_trial(run: Any) -> bool:
    return run.data.tags.get("cleansweep.kind") == "trial"


def is_lost(run: Any) -> bool:
    # Tagged by the driver on resume: a trial created after Tune's last snapshot, re-suggested under another id.
    return "cleansweep.lost" in run.data.tags


def run_history(client: Any, run: Any) -> dict[str, list[tuple[int, int, float]]]:
    """Metric key -> every logged point (step, timestamp, value), duplicates kept."""
    return {key: [(int(m.step), int(m.timestamp), float(m.value)) for m in client.get_metric_history(run.info.run_id,
                                                                                                     key)]
            for key in run.data.metrics}


def evaluations(history: dict[str, list[tuple[int, int, float]]]) -> dict[int, tuple[float, float]]:
    """step -> (top1, asr), the newest value per step (what a reader of the store sees)."""
    latest: dict[str, dict[int, tuple[int, float]]] = {}
    for key in (TOP1, ASR):
        for step, ts, value in history.get(key, []):
            if step not in latest.setdefault(key, {}) or ts >= latest[key][step][0]:
                latest[key][step] = (ts, value)
    steps = set(latest.get(TOP1, {})) & set(latest.get(ASR, {}))
    return {s: (latest[TOP1][s][1], latest[ASR][s][1]) for s in sorted(steps)}


def repeated_steps(history: dict[str, list[tuple[int, int, float]]]) -> int:
    """Points logged again at a step that key already had (0 when every step of every key is logged once)."""
    return sum(len(points) - len({step for step, _, _ in points}) for points in history.values())


# ============================================================================================ part 3: inputs
@dataclass
class Case:
    """One bad input: the command, the words its message must contain (the problem) and an optional extra check."""

    area: str
    what: str
    args: list[str]
    expect: tuple[str, ...]
    check: Callable[[], str | None] | None = None


@dataclass
class Outcome:
    case: Case
    code: int
    message: str
    problems: list[str] = field(default_factory=list)


FIX = re.compile(r"\b(pass|use|choose|set|add|remove|rename|fix|drop|delete|give|write|check|point|quote|lower|ask|"
                 r"replace|export|re-save|re-download|resume|should|must|needs?|see|try|put|restore|start|fill|"
                 r"name one|connect|e\.g\.)(?!\w)", re.IGNORECASE)


def judge(case: Case, proc: subprocess.CompletedProcess, wrote: str | None) -> Outcome:
    """Apply the criteria: exit 2, one stderr line 'error: ...', no traceback, problem and fix named, nothing
    changed on disk, the case's own check."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("error: ")), lines[0] if lines else "")
    out = Outcome(case, proc.returncode, message)
    if proc.returncode != 2:
        out.problems.append(f"exit {proc.returncode}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        out.problems.append(f"{len(lines)} stderr lines")
    if "Traceback" in proc.stderr + proc.stdout:
        out.problems.append("traceback")
    missing = [w for w in case.expect if w.lower() not in message.lower()]
    if missing:
        out.problems.append(f"does not name {missing}")
    if not FIX.search(message):
        out.problems.append("no fix")
    if wrote:
        out.problems.append(f"wrote: {wrote}")
    extra = case.check() if case.check else None
    if extra:
        out.problems.append(extra)
    return out


class _CodeInPickle:
    """Unpickling this runs a shell command (it creates a marker file): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def _bad_checkpoints(fx: Path, good: Path) -> dict[str, Path]:
    """Broken and hostile checkpoint files next to a good tiny-rn one."""
    import safetensors.torch
    import torch

    from cleansweep.models import create_model, save_checkpoint

    d = fx / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _CodeInPickle(d / "PWNED")}, d / "evil.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(d / "script.pt"))
    (d / "junk.safetensors").write_bytes(os.urandom(4096))
    (d / "junk.pt").write_bytes(b"PK\x03\x04" + os.urandom(4096))
    (d / "empty.safetensors").write_bytes(b"")
    torch.save([torch.zeros(2)], d / "list.pt")
    save_checkpoint(d / "vit.safetensors", create_model("tiny-vit", seed=0).model, {"model": "tiny-vit"})
    state = safetensors.torch.load_file(str(good))
    first = next(k for k, v in state.items() if v.ndim >= 1 and v.shape[0] > 1)
    state[first] = state[first][:1].contiguous()  # one tensor of the wrong shape, no card
    safetensors.torch.save_file(state, str(d / "resized.safetensors"))
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(d / "foreign.safetensors"))
    shutil.copyfile(good, d / "badcard.safetensors")
    (d / "badcard.json").write_text("{not json")
    return {p.name: p for p in d.iterdir()}


def _bad_csvs(fx: Path, world: dict) -> dict[str, Path]:
    """Image-caption CSVs with one thing wrong each (image paths absolute, into the tiny world)."""
    import pandas as pd

    d = fx / "csv"
    (d / "img").mkdir(parents=True, exist_ok=True)
    rows = pd.read_csv(world["clean_csv"], dtype=str)
    base = Path(world["clean_csv"]).parent
    good = [(str(base / img), cap) for img, cap in zip(rows["image"], rows["caption"], strict=True)][:8]
    png = Path(good[0][0]).read_bytes()
    (d / "img" / "junk.png").write_bytes(os.urandom(512))
    (d / "img" / "truncated.png").write_bytes(png[: len(png) // 2])

    def write(name: str, pairs: list[tuple[str, str]], header: tuple[str, str] = ("image", "caption")) -> None:
        with open(d / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *pairs])

    write("nocaption", good, header=("image", "text"))
    write("blankcaption", [*good[:3], (good[3][0], " "), *good[4:]])
    write("missingimage", [*good[:3], (str(d / "img" / "gone.png"), "a photo of a banana"), *good[4:]])
    write("corruptimage", [*good[:3], (str(d / "img" / "junk.png"), "a photo of a banana"), *good[4:]])
    write("truncatedimage", [*good[:3], (str(d / "img" / "truncated.png"), "a photo of a banana"), *good[4:]])
    (d / "empty.csv").write_bytes(b"")
    (d / "header.csv").write_text("image,caption\n")
    (d / "binary.csv").write_bytes(b"image,caption\n\xff\xfe\x00\x81" + os.urandom(64))
    (d / "ragged.csv").write_text(f"image,caption\n{good[0][0]},a,b,c\n{good[1][0]},d\n\"unclosed,e\n")
    return {p.stem: p for p in d.glob("*.csv")}


def _bad_eval_folders(fx: Path, world: dict) -> dict[str, Path]:
    """Evaluation folders with one thing wrong each (copies of the tiny world's)."""
    d = fx / "eval"
    src = Path(world["eval_dir"])
    out = {}
    for name in ("oneempty", "corrupt", "badnames", "badtemplates"):
        shutil.rmtree(d / name, ignore_errors=True)
        shutil.copytree(src, d / name)
        out[name] = d / name
    first = sorted(p for p in (d / "oneempty").iterdir() if p.is_dir())[0]
    for image in first.iterdir():
        image.unlink()
    cls = sorted(p for p in (d / "corrupt").iterdir() if p.is_dir())[0]
    (cls / "zz-junk.png").write_bytes(os.urandom(512))
    (d / "badnames" / "classnames.json").write_text("[1, 2]")
    (d / "badtemplates" / "templates.json").write_text('["a photo without a slot"]')
    (d / "flat").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next(src.rglob("*.png")), d / "flat" / "one.png")
    (d / "noimages" / "banana").mkdir(parents=True, exist_ok=True)
    (d / "noimages" / "banana" / "readme.txt").write_text("not an image")
    return {**out, "flat": d / "flat", "noimages": d / "noimages"}


def input_fixtures(root: Path) -> dict[str, Any]:
    """Inputs of the bad-input cases under root/fx: a tiny world, a random tiny-rn checkpoint, broken CSVs,
    checkpoints and evaluation folders, a poisoned output folder and a tampered copy of it."""
    from cleansweep.data import make_demo_world
    from cleansweep.models import create_model, save_checkpoint
    from cleansweep.poison import poison_csv

    fx = root / "fx"
    world = make_demo_world(fx / "world", seed=0, n_train=32, n_clean=32, n_eval=12, image_size=32, num_classes=6)
    model = fx / "model.safetensors"
    if not model.is_file():
        save_checkpoint(model, create_model("tiny-rn", seed=0).model, {"model": "tiny-rn"})
    poison_csv(world["train_csv"], fx / "poisoned", attack="badnet", target="banana", fraction=0.25, seed=0,
               image_size=32)
    tampered = fx / "poisoned-tampered"
    if not tampered.exists():
        shutil.copytree(fx / "poisoned", tampered)
        csv = next(tampered.glob("*.csv"))
        csv.write_text(csv.read_text() + csv.read_text().splitlines()[1] + "\n")
    listed = fx / "manifest-list"
    listed.mkdir(exist_ok=True)
    (listed / "manifest.json").write_text("[1, 2]")
    return {"fx": fx, "world": world, "model": model, "ckpt": _bad_checkpoints(fx, model),
            "csv": _bad_csvs(fx, world), "eval": _bad_eval_folders(fx, world), "tampered": tampered,
            "manifest_list": listed}


def finished_sweep(root: Path, fixtures: dict[str, Any], env: dict[str, str]) -> Path:
    """A finished one-trial sweep `kept` in root/work0 (its folder and MLflow database are what must not change)."""
    work = root / "work0"
    if (work / "sweeps" / "kept" / "leaderboard.csv").is_file():
        return work
    space = fixtures["fx"] / "yaml" / "kept.yaml"
    write_space(space, fixtures["world"], fixtures["model"], KEPT_EXTRA)
    proc = run_cli(["search", str(space), "--name", "kept", "--workdir", str(work)], env, root)
    if proc.returncode != 0:
        raise SystemExit(f"the reference sweep failed:\n{proc.stderr[-3000:]}")
    return work


KEPT_EXTRA = """
epochs: 1
base: {optim.warmup_steps: 2, device: cpu}
space:
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
search: {num_samples: 1, max_concurrent: 1}
scheduler: {name: none}
resources: {cpu: 1}
"""


def _yaml_texts(fx: dict[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """slug -> (space YAML text, words its error must name)."""
    w = fx["world"]
    model = f"model: {{checkpoint: {fx['model']}, name: tiny-rn}}\n"

    def data(csv: Any = None, eval_dir: Any = None, more: str = "") -> str:
        return (f"data: {{train_csv: {csv or w['clean_csv']}, eval_dir: {eval_dir or w['eval_dir']}, "
                f"batch_size: 16{more}}}\n")

    rest = KEPT_EXTRA
    ok = model + data() + rest
    lr = "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"
    return {
        "syntax": (model + data() + "space: {optim.lr: [1, 2\n", ("invalid yaml", "line")),
        "empty": ("", ("model",)),
        "unknown-top-key": (ok + "epoch: 3\n", ("epoch", "unknown key")),
        "unknown-nested-key": (ok.replace("max_concurrent: 1", "max_concurent: 1"), ("max_concurent",)),
        "unknown-domain": (ok.replace(lr, "optim.lr: {logunifrom: [1.0e-4, 1.0e-2]}"), ("logunifrom",)),
        "reversed-bounds": (ok.replace(lr, "optim.lr: {uniform: [0.01, 0.001]}"), ("optim.lr", "low")),
        "not-a-field": (ok.replace(lr, "optim.learning_rate: {choice: [0.001]}"), ("optim.learning_rate",)),
        "top-level-searched": (ok.replace(lr, "seed: {choice: [0, 1]}"), ("seed", "top-level")),
        "bad-candidate": (ok.replace(lr, "optim.lr: {choice: [-1.0, 0.001]}"), ("optim.lr",)),
        "wrong-type": (ok.replace("epochs: 1", "epochs: three"), ("epochs",)),
        "unknown-method": (ok.replace("device: cpu", "device: cpu, method.name: cleanclip"), ("cleanclip",)),
        "grid-with-range": (ok.replace("num_samples: 1", "algorithm: grid, num_samples: 1"), ("grid",)),
        "two-model-sources": (ok.replace("name: tiny-rn}", "name: tiny-rn, preset: demo}"), ("checkpoint",)),
        "no-data": (model + rest, ("data",)),
        "missing-checkpoint": (ok.replace(str(fx["model"]), str(fx["fx"] / "gone.safetensors")),
                               ("gone.safetensors", "not found")),
        "missing-eval-dir": (model + data(eval_dir=fx["fx"] / "gone-eval") + rest, ("gone-eval", "not found")),
        "unknown-attack": (ok + "attack: {name: badnt}\n", ("badnt",)),
        "unknown-model": (ok.replace("name: tiny-rn}", "name: tiny-rnn}"), ("tiny-rnn",)),
        "impossible-resources": (ok.replace("cpu: 1}", "cpu: 64}"), ("resources",)),
        "csv-missing-column": (model + data(csv=fx["csv"]["nocaption"]) + rest, ("caption",)),
        "target-not-a-class": (ok + "attack: {target: zebra}\n", ("zebra",)),
    }


def yaml_cases(fx: dict[str, Any], work: Path) -> list[Case]:
    """Bad search-space files, each given to `cleansweep search` against the workdir of the finished sweep."""
    cases = []
    for slug, (text, expect) in _yaml_texts(fx).items():
        path = fx["fx"] / "yaml" / f"{slug}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        cases.append(Case("YAML", slug, ["search", str(path), "--name", f"bad-{slug}", "--workdir", str(work)],
                          expect))
    return cases


def cli_cases(fx: dict[str, Any], work: Path) -> list[Case]:
    """Bad flags, names and resumes (against the finished sweep `kept`)."""
    kept = str(fx["fx"] / "yaml" / "kept.yaml")
    changed = fx["fx"] / "yaml" / "kept-changed.yaml"
    changed.write_text(Path(kept).read_text().replace("epochs: 1", "epochs: 2"))
    wd = ["--workdir", str(work)]
    out = str(fx["fx"] / "world")
    data = ["--train-csv", fx["world"]["train_csv"], "--eval-data", fx["world"]["eval_dir"]]
    return [
        Case("CLI", "unknown command", ["frobnicate"], ("frobnicate",)),
        Case("CLI", "unknown flag", ["search", kept, "--epochs", "3", *wd], ("--epochs",)),
        Case("CLI", "--num-samples 0", ["search", kept, "--num-samples", "0", "--name", "n0", *wd], ("--num-samples",)),
        Case("CLI", "--threshold 5", ["report", "kept", "--threshold", "5", *wd], ("--threshold",)),
        Case("CLI", "file-store tracking URI", ["results", "kept", "--tracking-uri", "file:///tmp/mlruns", *wd],
             ("file store",)),
        Case("CLI", "pretrain without data", ["pretrain", "--name", "p", *wd], ("train_csv",)),
        Case("CLI", "--set without =", ["pretrain", *data, "--set", "epochs", *wd], ("epochs",)),
        Case("CLI", "unknown knob", ["data", "demo", "--out", "w", "--knob", "nope=1"], ("nope",)),
        Case("CLI", "demo world over another", ["data", "demo", "--out", out, "--n-eval", "60"], (out,)),
        Case("CLI", "--device cuda without GPU", ["evaluate", str(fx["model"]), "--eval-data",
                                                  fx["world"]["eval_dir"], *TRIGGER, "--device", "cuda"], ("cuda",)),
        Case("name", "name with a slash", ["search", kept, "--name", "a/b", *wd], ("--name",)),
        Case("name", "existing name without --resume", ["search", kept, "--name", "kept", *wd], ("kept", "--resume")),
        Case("resume", "--resume of an unknown sweep", ["search", kept, "--name", "nosuch", "--resume", *wd],
             ("nosuch",)),
        Case("resume", "--resume with a changed space", ["search", str(changed), "--name", "kept", "--resume", *wd],
             ("changed",)),
        Case("resume", "results of an unknown sweep", ["results", "nosuch", *wd], ("nosuch",)),
    ]


def _absent(path: Path) -> Callable[[], str | None]:
    return lambda: f"left {path.name} behind" if path.exists() else None


def csv_cases(fx: dict[str, Any], scratch: Path) -> list[Case]:
    """Bad CSV files and rows, bad images and poison settings, given to `cleansweep poison` (every row triggered, so
    a bad image is met); a failed poisoning must leave no output folder behind."""
    c = fx["csv"]

    def poison(slug: str, csv: Any, expect: tuple[str, ...], *extra: str, area: str = "CSV") -> Case:
        out = scratch / f"poison-{slug}"
        args = ["poison", "--csv", str(csv), "--out", str(out), "--image-size", "32", *extra]
        if "--num-poison" not in extra and "--fraction" not in extra:
            args += ["--fraction", "1"]
        return Case(area, slug, args, expect, _absent(out))

    good = fx["world"]["train_csv"]
    return [
        poison("missing CSV", fx["fx"] / "gone.csv", ("gone.csv", "not found")),
        poison("empty CSV file", c["empty"], ("empty",)),
        poison("missing caption column", c["nocaption"], ("caption",)),
        poison("blank caption", c["blankcaption"], ("row 3", "caption")),
        poison("not UTF-8", c["binary"], ("binary.csv",)),
        poison("missing image", c["missingimage"], ("row 3", "gone.png")),
        poison("corrupt image", c["corruptimage"], ("row 3", "junk.png"), area="image"),
        poison("truncated image", c["truncatedimage"], ("row 3", "truncated.png"), area="image"),
        poison("--fraction 1.5", good, ("fraction",), "--fraction", "1.5"),
        poison("unknown attack", good, ("badnt",), "--attack", "badnt"),
    ]


def manifest_cases(fx: dict[str, Any]) -> list[Case]:
    """Poison output folders that already hold something: another request, a tampered copy, a broken manifest."""
    good = str(fx["world"]["train_csv"])
    same = ["--image-size", "32", "--fraction", "0.25"]
    return [
        Case("manifest", "--out holds another poisoning", ["poison", "--csv", good, "--out", str(fx["fx"] / "poisoned"),
                                                           *same, "--seed", "1"], ("exists",)),
        Case("manifest", "--out holds a tampered copy", ["poison", "--csv", good, "--out", str(fx["tampered"]), *same],
             ("exists",)),
        Case("manifest", "manifest.json not an object", ["poison", "--csv", good, "--out", str(fx["manifest_list"]),
                                                         *same], ("exists",)),
    ]


TRIGGER = ["--attack", "badnet", "--patch-size", "4"]  # checkpoints without a card recording their trigger


def checkpoint_cases(fx: dict[str, Any]) -> list[Case]:
    """Bad checkpoint files given to `cleansweep evaluate`; the pickled command must never run."""
    k, eval_dir = fx["ckpt"], str(fx["world"]["eval_dir"])
    marker = k["evil.pt"].parent / "PWNED"

    def ev(slug: str, ckpt: Any, expect: tuple[str, ...], *extra: str, check: Any = None) -> Case:
        args = ["evaluate", str(ckpt), "--eval-data", eval_dir, "--device", "cpu", *TRIGGER, *extra]
        return Case("checkpoint", slug, args, expect, check)

    return [
        ev("pickle with code", k["evil.pt"], ("evil.pt", "weights_only"),
           check=lambda: "THE PICKLED COMMAND RAN" if marker.exists() else None),
        ev("TorchScript archive", k["script.pt"], ("TorchScript",)),
        ev("junk .safetensors", k["junk.safetensors"], ("junk.safetensors",)),
        ev("list of tensors", k["list.pt"], ("no model weights",)),
        ev("weights of another model", k["vit.safetensors"], ("tiny-vit",), "--model", "tiny-rn"),
        ev("a tensor of the wrong shape", k["resized.safetensors"], ("shape",), "--model", "tiny-rn"),
        ev("no card, not a known model", k["foreign.safetensors"], ("--model",)),
        ev("unreadable card", k["badcard.safetensors"], ("badcard.json",)),
    ]


def eval_cases(fx: dict[str, Any]) -> list[Case]:
    """Bad evaluation folders and targets given to `cleansweep evaluate` (a good checkpoint)."""
    e = fx["eval"]

    def ev(slug: str, folder: Any, expect: tuple[str, ...], *extra: str) -> Case:
        args = ["evaluate", str(fx["model"]), "--eval-data", str(folder), "--device", "cpu", *TRIGGER, *extra]
        return Case("eval folder", slug, args, expect)

    return [
        ev("missing folder", fx["fx"] / "gone-eval", ("gone-eval", "not found")),
        ev("no class subfolders", e["flat"], ("subfolder",)),
        ev("a class without images", e["oneempty"], ("hold no images",)),
        ev("corrupt image", e["corrupt"], ("zz-junk.png",)),
        ev("classnames.json not a mapping", e["badnames"], ("classnames.json",)),
        ev("target not a class", fx["world"]["eval_dir"], ("zebra",), "--target", "zebra"),
    ]


def store_runs(work: Path) -> dict[str, str]:
    """run id -> 'name STATUS' of every run in the sweep workdir's sqlite store, read-only (stdlib sqlite3)."""
    import sqlite3

    db = work / "mlflow.db"
    if not db.is_file():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {rid: f"{name} {status}" for rid, name, status in con.execute("select run_uuid, name, status from runs")}


def describe(changes: list[str], runs_before: dict[str, str], runs_after: dict[str, str], root: Path) -> str:
    """What a refused command wrote anyway: new, changed and removed files and the MLflow runs it added or ended."""
    kinds = Counter(c.split(" ", 1)[0] for c in changes)
    paths = [Path(c.split(" ", 1)[1]) for c in changes]
    dirs = sorted({"/".join(p.relative_to(root).parts[:3]) for p in paths if p.is_relative_to(root)})
    runs = [f"+run {v}" for k, v in runs_after.items() if k not in runs_before]
    runs += [f"run {runs_before[k]} -> {v.split()[-1]}" for k, v in runs_after.items()
             if k in runs_before and runs_before[k] != v]
    files = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f" files ({', '.join(dirs[:3])})"
    return ", ".join([files, *runs])


def _controls(fx: dict[str, Any], work: Path, env: dict[str, str], root: Path) -> list[str]:
    """Valid commands on the protected folders: exit 0 and nothing changed (the criteria can only catch writes
    if reads leave every byte alone)."""
    protected = [fx["fx"], work]
    rows = []
    for args in (["results", "kept", "--workdir", str(work), "--format", "json"],
                 ["poison", "--csv", str(fx["world"]["train_csv"]), "--out", str(fx["fx"] / "poisoned"),
                  "--image-size", "32", "--fraction", "0.25"]):
        before = tree_digest(protected)
        proc = run_cli(args, env, root)
        changes = digest_changes(before, tree_digest(protected))
        rows.append(f"control `cleansweep {args[0]} ...`: exit {proc.returncode}, {len(changes)} files changed")
    return rows


def run_inputs(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Part 3: every bad input through the CLI, judged by `judge`; prints the table of messages."""
    root = root / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    fx = input_fixtures(root)
    work = finished_sweep(root, fx, env)
    scratch = root / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    cases = (yaml_cases(fx, work) + cli_cases(fx, work) + csv_cases(fx, scratch) + manifest_cases(fx)
             + checkpoint_cases(fx) + eval_cases(fx))
    controls = _controls(fx, work, env, root)
    protected = [fx["fx"], work]
    before, runs_before = tree_digest(protected), store_runs(work)
    outcomes = []
    for i, case in enumerate(cases, 1):
        cwd = scratch / f"{i:02d}"
        cwd.mkdir(parents=True)
        proc = run_cli([str(a) for a in case.args], env, cwd, timeout=600)
        (cwd / "stdout.txt").write_text(proc.stdout)
        (cwd / "stderr.txt").write_text(proc.stderr)
        after, runs_after = tree_digest(protected), store_runs(work)
        changes = digest_changes(before, after)
        outcome = judge(case, proc, describe(changes, runs_before, runs_after, root) if changes else None)
        before, runs_before = after, runs_after  # the next case starts from what this one left
        outcomes.append(outcome)
        print(f"[{i}/{len(cases)}] {case.area}: {case.what}: {'ok' if not outcome.problems else outcome.problems}",
              file=sys.stderr, flush=True)
    return _inputs_summary(outcomes, controls, root)


def _inputs_summary(outcomes: list[Outcome], controls: list[str], root: Path) -> dict[str, Any]:
    rows = [[i, o.case.area, o.case.what, o.code, o.message.replace(str(root), "$W").removeprefix("error: "),
             "ok" if not o.problems else "FAIL: " + "; ".join(o.problems).replace(str(root), "$W")]
            for i, o in enumerate(outcomes, 1)]
    passed = sum(not o.problems for o in outcomes)
    print(markdown(["#", "area", "bad input", "exit", "message (after `error: `)", "verdict"], rows))
    print()
    for line in controls:
        print(f"- {line}")
    print(f"\n**{passed} of {len(outcomes)} bad inputs pass** (exit 2, one `error:` line, no traceback, problem and "
          "fix named, nothing on disk changed)")
    return {"passed": passed, "cases": len(outcomes), "controls": controls,
            "rows": [dict(zip(["n", "area", "input", "exit", "message", "verdict"], r, strict=True)) for r in rows]}



# ============================================================================================ part 1: kill -9
@dataclass
class Seen:
    """What the store shows of a running sweep: its parent run and each trial run's status and evaluations."""

    parent: bool = False
    start_logged: bool = False
    trials: dict[str, tuple[str, int]] = field(default_factory=dict)  # trial id -> (status, evaluations logged)

    @property
    def evaluations(self) -> int:
        return sum(n for _, n in self.trials.values())


def look(workdir: Path, name: str) -> Seen:
    """The store's view of sweep `name` now (empty while the driver has not created it; retried on a busy db)."""
    try:
        client = mlflow_client(workdir)
        if client is None:
            return Seen()
        seen = Seen()
        for run in sweep_runs(client, name):
            if not is_trial(run):
                seen.parent, seen.start_logged = True, f"start_{TOP1}" in run.data.metrics
            elif not is_lost(run):
                n = len(client.get_metric_history(run.info.run_id, TOP1)) if TOP1 in run.data.metrics else 0
                seen.trials[run.data.tags["cleansweep.trial_id"]] = (run.info.status, n)
        return seen
    except Exception:  # noqa: BLE001 - the sweep is writing the database; look again at the next poll
        return Seen()


def kill_events(trials: int, evals_per_trial: int) -> dict[int, tuple[str, Callable[[Seen, str], bool]]]:
    """The five kill points: a description and the predicate on (store view, driver output) that fires it."""
    half = max(1, evals_per_trial // 2)

    def mid(s: Seen) -> bool:
        return any(st == "RUNNING" and half <= n < evals_per_trial for st, n in s.trials.values())

    return {
        1: ("the driver evaluates the starting model, no trial yet",
            lambda s, out: not s.trials and ("evaluating the starting model" in out or "Ray dashboard" in out)),
        2: ("first trial's run exists, nothing reported", lambda s, out: len(s.trials) >= 1),
        3: (f"a running trial has reported {half} of {evals_per_trial} evaluations", lambda s, out: mid(s)),
        4: ("a trial's run just turned FINISHED",
            lambda s, out: any(st == "FINISHED" for st, _ in s.trials.values())),
        5: (f"the last trial's run exists ({trials} of {trials})", lambda s, out: len(s.trials) >= trials),
    }


def wait_for(proc: subprocess.Popen, log: Path, workdir: Path, name: str, event: Callable[[Seen, str], bool],
             timeout: float = 600) -> Seen | None:
    """Poll the store and the driver's output until `event` holds; None when the driver ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        seen = look(workdir, name)
        if event(seen, log.read_text(errors="replace")):
            return seen
        time.sleep(POLL_S)
    return None


def kill_group(proc: subprocess.Popen) -> list[str]:
    """SIGKILL the driver's process group (it was started in its own session, Ray's processes with it); returns the
    names of the driver's descendants that outlived that (other process groups), then killed one by one."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    survivors = []
    for child in family:
        try:
            child.wait(timeout=5)  # a process still exiting is not a survivor
        except psutil.TimeoutExpired:
            if child.status() == psutil.STATUS_ZOMBIE:  # dead, waiting for a parent that does not reap it
                continue
            survivors.append(f"{child.name()} (pid {child.pid}, group {os.getpgid(child.pid)})")
            child.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return survivors


def tune_lines(sweep_dir: Path) -> dict[str, int]:
    """Tune's trial folders: trial id -> lines in its result.json (one per reported result)."""
    main = sweep_dir / "main"
    if not main.is_dir():
        return {}
    return {d.name: len((d / "result.json").read_text().splitlines()) if (d / "result.json").is_file() else 0
            for d in main.iterdir() if (d / "params.json").is_file()}


def finished_trials(workdir: Path, name: str) -> dict[str, dict[str, Any]]:
    """Trial runs FINISHED in the store: trial id -> run id, end time and evaluation steps."""
    client = mlflow_client(workdir)
    out = {}
    for run in sweep_runs(client, name) if client else []:
        if is_trial(run) and not is_lost(run) and run.info.status == "FINISHED":
            steps = sorted({int(m.step) for m in client.get_metric_history(run.info.run_id, TOP1)})
            out[run.data.tags["cleansweep.trial_id"]] = {"run_id": run.info.run_id, "end": run.info.end_time,
                                                         "steps": steps}
    return out



def find_study(state: Any) -> Any:
    """The Optuna study inside Tune's pickled searcher state (a dict of the searcher's attributes)."""
    import optuna

    todo, seen = [state], set()
    while todo:
        obj = todo.pop()
        if isinstance(obj, optuna.Study):
            return obj
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
    return None


def optuna_trials(sweep_dir: Path) -> list[Any]:
    """Optuna's trials from the newest searcher snapshot Tune wrote in the sweep folder ([] without one)."""
    # One file per driver session, named by the session's start time: the newest name is the resumed session's.
    files = sorted((sweep_dir / "main").glob("searcher-state-*.pkl"))
    if not files:
        return []
    with open(files[-1], "rb") as f:
        state = pickle.load(f)  # this benchmark's own sweep wrote it (never unpickle a file from elsewhere)
    study = find_study(state)
    return study.get_trials(deepcopy=False) if study is not None else []


def recomputed_board(kept: list[Any], histories: dict[str, dict], threshold: float) -> dict[str, tuple]:
    """Trial id -> (feasible, top1, asr, step) of its best feasible evaluation, from the raw MLflow histories:
    the most accurate evaluation with ASR <= threshold, the earliest step on ties."""
    out = {}
    for run in kept:
        ev = evaluations(histories[run.info.run_id])
        feasible = [(top1, -step, asr, step) for step, (top1, asr) in ev.items() if asr <= threshold]
        tid = run.data.tags["cleansweep.trial_id"]
        if feasible:
            top1, _, asr, step = max(feasible)
            out[tid] = (True, round(top1, 6), round(asr, 6), step)
        else:
            out[tid] = (False, None, None, -1)
    return out


def _board_rows(records: list[dict[str, Any]]) -> dict[str, tuple]:
    def num(v: Any) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)

    return {str(r["trial_id"]): (bool(r["feasible"]), num(r[TOP1]), num(r[ASR]), int(r["step"])) for r in records}


def boards_match(expected: dict[str, tuple], workdir: Path, name: str, env: dict[str, str]) -> tuple[bool, bool]:
    """Whether `cleansweep results NAME --format json` and Tune's leaderboard.csv equal the recomputation (every
    trial's best feasible evaluation, and the best trial: highest accuracy, then the lowest trial id)."""
    import pandas as pd

    proc = run_cli(["results", name, "--workdir", str(workdir), "--format", "json", "--top-k", "10000"], env,
                   workdir)
    printed = json.loads(proc.stdout) if proc.returncode == 0 else {"top": [], "best": None}
    csv = workdir / "sweeps" / name / "leaderboard.csv"
    tune = _board_rows(pd.read_csv(csv).to_dict("records")) if csv.is_file() else {}
    best = min(((-v[1], tid) for tid, v in expected.items() if v[0]), default=(None, None))[1]
    printed_best = (printed.get("best") or {}).get("trial_id")
    return _board_rows(printed["top"]) == expected and printed_best == best, tune == expected



def after_resume(workdir: Path, name: str, threshold: float, at_kill: dict[str, dict], tune_at_kill: dict[str, int],
                 env: dict[str, str]) -> dict[str, Any]:
    """The counts that should all be 0 once `--resume` finished, and whether the leaderboards are right."""
    client = mlflow_client(workdir)
    runs = sweep_runs(client, name)
    trials = [r for r in runs if is_trial(r)]
    kept = [r for r in trials if not is_lost(r)]
    histories = {r.info.run_id: run_history(client, r) for r in runs}
    by_id = {r.data.tags["cleansweep.trial_id"]: r for r in kept}
    tune_now = tune_lines(workdir / "sweeps" / name)
    lost = {}
    for tid, rec in at_kill.items():
        run = by_id.get(tid)
        steps = sorted({s for s, _, _ in histories[run.info.run_id].get(TOP1, [])}) if run else None
        why = ["missing" if run is None else "another run" if run.info.run_id != rec["run_id"] else "",
               "reopened (new end time)" if run is not None and run.info.end_time != rec["end"] else "",
               f"steps {rec['steps']} -> {steps}" if run is not None and steps != rec["steps"] else "",
               "Tune re-reported it" if tune_now.get(tid, 0) > tune_at_kill.get(tid, 0) else ""]
        if any(why):
            lost[tid] = ", ".join(w for w in why if w)
    expected = recomputed_board(kept, histories, threshold)
    printed_ok, tune_ok = boards_match(expected, workdir, name, env)
    states = Counter(t.state.name for t in optuna_trials(workdir / "sweeps" / name))
    return {"trials": len(kept), "completed_lost": len(lost), "completed_lost_why": lost,
            "duplicate_runs": sum(n - 1 for n in Counter(r.data.tags["cleansweep.trial_id"] for r in trials).values()),
            "running_mlflow": sum(r.info.status == "RUNNING" for r in runs), "running_optuna": states["RUNNING"],
            "steps_twice": sum(repeated_steps(h) for h in histories.values()), "resuggested": len(trials) - len(kept),
            "statuses": dict(Counter(r.info.status for r in kept)), "optuna": dict(states),
            "results_match": printed_ok, "tune_board_match": tune_ok}


KILL_EXTRA = """
objective: {{threshold: {threshold}}}
epochs: {epochs}
eval_every: 0.5
base: {{optim.warmup_steps: 2, device: cpu}}
space:
  optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}
search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: 2}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
"""


def kill_point(work: Path, env: dict[str, str], space: Path, point: int, event: Callable[[Seen, str], bool],
               threshold: float) -> dict[str, Any]:
    """One kill -9 at `event`, then `--resume` to the end; the observed moment and the counts."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    name = f"kill{point}"
    args = ["search", str(space), "--name", name, "--workdir", str(work)]
    log = work / "first.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, *args], env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        fired = wait_for(proc, log, work, name, event)
    finally:
        survivors = kill_group(proc) if proc.poll() is None else []
    killed_at = time.monotonic() - t0
    if fired is None:
        return {"point": point, "error": f"the driver ended (exit {proc.returncode}) before the event"}
    seen = look(work, name)
    at_kill, tune_at_kill = finished_trials(work, name), tune_lines(work / "sweeps" / name)
    (work / "at-kill.json").write_text(json.dumps({"finished": at_kill, "tune_lines": tune_at_kill,
                                                   "trials": seen.trials}, indent=2))
    t1 = time.monotonic()
    resumed = run_cli([*args, "--resume"], env, work, timeout=1800)
    refused = resumed.stderr.strip() if resumed.returncode == 2 and "drop --resume" in resumed.stderr else None
    if refused:  # killed before the sweep existed: nothing to resume, start it as the message says
        resumed = run_cli(args, env, work, timeout=1800)
    (work / "resume.log").write_text(resumed.stdout + resumed.stderr)
    counts = after_resume(work, name, threshold, at_kill, tune_at_kill, env)
    return {"point": point, "killed_at_s": round(killed_at, 1), "trial_runs_at_kill": len(seen.trials),
            "evaluations_at_kill": seen.evaluations, "finished_at_kill": len(at_kill),
            "parent_at_kill": seen.parent, "survivors": survivors, "resume_refused": refused,
            "resume_exit": resumed.returncode,
            "resume_s": round(time.monotonic() - t1, 1), **counts}


def run_kill(root: Path, env: dict[str, str], points: list[int], *, trials: int, epochs: int,
             clean_rows: int) -> dict[str, Any]:
    """Part 1: kill -9 at each point, resume, count; prints the table."""
    model = poisoned_model(root, clean_rows)
    threshold = threshold_for(model)
    evals = round(epochs / 0.5)
    events = kill_events(trials, evals)
    space = write_space(root / "kill" / "space.yaml", model["world"], Path(model["checkpoint"]),
                        KILL_EXTRA.format(threshold=threshold, epochs=epochs, trials=trials))
    rows = []
    for point in points:
        rows.append({"event": events[point][0], **kill_point(root / "kill" / f"point{point}", env, space, point,
                                                            events[point][1], threshold)})
        print(f"kill point {point}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown(
        ["point", "killed when", "at kill: parent run / trial runs / evaluations / finished", "resume exit",
         "completed trials lost", "duplicate runs", "RUNNING left (MLflow / Optuna)", "steps logged twice",
         "re-suggested", "`results` = MLflow", "Tune board = MLflow", "outlived kill -9 of the group"],
        [[r["point"], f"{r['event']} ({r.get('killed_at_s')} s)",
          f"{'yes' if r.get('parent_at_kill') else 'no'} / {r.get('trial_runs_at_kill')} / "
          f"{r.get('evaluations_at_kill')} / {r.get('finished_at_kill')}",
          f"2 -> {r['resume_exit']} (nothing to resume)" if r.get("resume_refused") else r.get("resume_exit",
                                                                                                 r.get("error")),
          r.get("completed_lost"), r.get("duplicate_runs"), f"{r.get('running_mlflow')} / {r.get('running_optuna')}",
          r.get("steps_twice"), r.get("resuggested"), r.get("results_match"), r.get("tune_board_match"),
          len(r.get("survivors", []))] for r in rows]))
    for r in rows:
        for tid, why in (r.get("completed_lost_why") or {}).items():
            print(f"- point {r['point']}: trial {tid} had finished before the kill: {why}")
        if r.get("survivors"):
            print(f"- point {r['point']}: outlived the group kill: {'; '.join(r['survivors'])}")
        if r.get("resume_refused"):
            print(f"- point {r['point']}: `--resume` answered: {r['resume_refused']}")
    bad = [r["point"] for r in rows if r.get("resume_exit") != 0 or any(r.get(k) for k in (
        "completed_lost", "duplicate_runs", "running_mlflow", "running_optuna", "steps_twice"))
        or not (r.get("results_match") and r.get("tune_board_match"))]
    print(f"\n{trials} trials x {epochs} epochs x {clean_rows // 16} steps, an evaluation every half epoch, "
          f"2 at a time; threshold {threshold} (start ASR {model['metrics'][ASR]:.3f}); points not all 0: "
          f"{bad or 'none'}")
    return {"threshold": threshold, "start": model["metrics"], "rows": rows, "points_failing": bad}


# ============================================================================================ part 2: NaN trials
NAN_EXTRA = """
objective: {{threshold: {threshold}}}
epochs: 1
base: {{optim.warmup_steps: 2, method.name: shrink_perturb, device: cpu}}
space:
  method.perturb: {{choice: [0.0, 1.0e+30]}}
search: {{algorithm: optuna, num_samples: {trials}, max_concurrent: 2, n_startup_trials: {trials}}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
"""


def run_nan(root: Path, env: dict[str, str], clean_rows: int, trials: int = 4) -> dict[str, Any]:
    """Part 2: a sweep where trials with perturb 1e30 diverge; FAILED in MLflow and Optuna, the rest finish."""
    model = poisoned_model(root, clean_rows)
    work = root / "nan"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    space = write_space(work / "space.yaml", model["world"], Path(model["checkpoint"]),
                        NAN_EXTRA.format(threshold=threshold_for(model), trials=trials))
    t0 = time.monotonic()
    proc = run_cli(["search", str(space), "--name", "nan", "--workdir", str(work)], env, work)
    (work / "sweep.log").write_text(proc.stdout + proc.stderr)
    groups = nan_groups(work, "nan")
    expect = {0.0: ("FINISHED", "COMPLETE"), 1e30: ("FAILED", "FAIL")}
    ok = proc.returncode == 0 and set(groups) == set(expect) and all(
        set(g["mlflow"]) == {expect[v][0]} and set(g["optuna"]) == {expect[v][1]}
        and g["mlflow"][expect[v][0]] == g["optuna"][expect[v][1]] == g["trials"]
        and (v != 0.0 or g["finite_evaluations"] >= g["trials"]) for v, g in groups.items())
    print(markdown(["method.perturb", "trials", "MLflow status", "Optuna state", "finite evaluations logged",
                    "error recorded on the run"],
                   [[f"{v:g}", g["trials"], dict(g["mlflow"]), dict(g["optuna"]), g["finite_evaluations"],
                     "; ".join(sorted(g["errors"])) or "-"] for v, g in sorted(groups.items())]))
    print(f"\nsweep exit code {proc.returncode}; RUNNING left: {sum(g['mlflow']['RUNNING'] for g in groups.values())}; "
          f"diverging trials isolated: {'yes' if ok else 'NO'}")
    return {"exit": proc.returncode, "isolated": ok, "minutes": round((time.monotonic() - t0) / 60, 1),
            "groups": {str(v): {k: (dict(x) if isinstance(x, Counter) else sorted(x) if isinstance(x, set) else x)
                                for k, x in g.items()} for v, g in groups.items()}}


def nan_groups(work: Path, name: str) -> dict[float, dict[str, Any]]:
    """perturb value -> trial count, MLflow statuses, Optuna states, finite evaluations, recorded errors."""
    client = mlflow_client(work)

    def group(value: float) -> dict[str, Any]:
        return groups.setdefault(value, {"trials": 0, "mlflow": Counter(), "optuna": Counter(),
                                         "finite_evaluations": 0, "errors": set()})

    groups: dict[float, dict[str, Any]] = {}
    for run in (r for r in sweep_runs(client, name) if is_trial(r) and not is_lost(r)):
        g = group(float(run.data.params["method.perturb"]))
        g["trials"] += 1
        g["mlflow"][run.info.status] += 1
        ev = evaluations(run_history(client, run))
        g["finite_evaluations"] += sum(math.isfinite(a) and math.isfinite(b) for a, b in ev.values())
        if "cleansweep.error" in run.data.tags:
            g["errors"].add(run.data.tags["cleansweep.error"][:90])
    for trial in optuna_trials(work / "sweeps" / name):
        group(float(trial.params.get("method.perturb", math.nan)))["optuna"][trial.state.name] += 1
    return groups


# ================================================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["kill", "nan", "inputs", "all"], default="all")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--trials", type=int, default=4, help="trials per sweep of the kill part (2 at a time)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs per trial of the kill part (an evaluation every half epoch)")
    ap.add_argument("--clean-rows", type=int, default=480, help="cleaning pairs per trial epoch (batch 16)")
    ap.add_argument("--points", default="1,2,3,4,5", help="kill points to run, e.g. 1,4")
    args = ap.parse_args()
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="reliability-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = bench_env(root)
    parts = ["kill", "nan", "inputs"] if args.part == "all" else [args.part]
    for part in parts:
        t0 = time.monotonic()
        print(f"\n## {part} (workdir {root})\n", flush=True)
        if part == "inputs":
            out = run_inputs(root, env)
        elif part == "nan":
            out = run_nan(root, env, args.clean_rows)
        else:
            points = [int(p) for p in args.points.split(",")]
            out = run_kill(root, env, points, trials=args.trials, epochs=args.epochs, clean_rows=args.clean_rows)
        out["minutes"] = round((time.monotonic() - t0) / 60, 1)
        (root / f"reliability-{part}.json").write_text(json.dumps(out, indent=2, default=str))
        print(f"\n{part}: {out['minutes']} min", flush=True)


if __name__ == "__main__":
    main()
