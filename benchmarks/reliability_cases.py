"""The rows of the bad-input table (reliability part `inputs`): one `Case` per bad input, grouped by what is bad.
Numeric flags are in reliability_flags.py (derived from the CLI's parser)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability_fixtures import KEPT_EXTRA, SECRET, Case

TRIGGER = ["--attack", "badnet", "--patch-size", "4"]  # checkpoints without a card recording their trigger
LR = "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"
GRID_10M = ", ".join(f"optim.{k}: {{grid: [{', '.join(str(v) for v in vals)}]}}" for k, vals in {
    "lr": [f"{i}.0e-4" for i in range(1, 11)], "weight_decay": [i / 10 for i in range(10)],
    "beta1": [0.8 + i / 100 for i in range(10)], "beta2": [0.9 + i / 1000 for i in range(10)],
    "eps": [f"1.0e-{i}" for i in range(4, 14)], "warmup_steps": list(range(10)),
    "grad_clip": [i + 1.0 for i in range(10)]}.items())  # 10^7 grid points


def _yaml_parts(fx: dict[str, Any]) -> tuple[str, Callable[..., str], str, Callable[[str, str], str]]:
    """The model line, a data line maker, a valid space text and a substitution into it."""
    w = fx["world"]
    model = f"model: {{checkpoint: {fx['model']}, name: tiny-rn}}\n"

    def data(csv: Any = None, eval_dir: Any = None) -> str:
        return f"data: {{train_csv: {csv or w['clean_csv']}, eval_dir: {eval_dir or w['eval_dir']}, batch_size: 16}}\n"

    ok = model + data() + KEPT_EXTRA

    def sub(old: str, new: str) -> str:
        assert old in ok, old
        return ok.replace(old, new)

    return model, data, ok, sub


def _yaml_texts(fx: dict[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """slug -> (space YAML text, words its error must name); every file also carries SECRET in a comment."""
    model, data, ok, sub = _yaml_parts(fx)
    return {
        "syntax": (model + data() + f"space: {{optim.lr: [1, 2 # {SECRET}\n", ("invalid yaml", "line")),
        "empty": ("", ("model",)),
        "a list, not a mapping": ("- 1\n- 2\n", ("mapping|top level|list",)),
        "tabs for indentation": (ok.replace("  optim.lr", "\toptim.lr"), ("yaml",)),
        "python tag": (ok + "x: !!python/object/apply:os.system ['true']\n", ("yaml|tag",)),
        "duplicate key": (ok + "epochs: 3\n", ("epochs", "duplicate")),
        "duplicate nested key": (sub("max_concurrent: 1", "max_concurrent: 1, max_concurrent: 2"), ("max_concurrent",)),
        "unknown-top-key": (ok + "epoch: 3\n", ("epoch", "unknown key")),
        "unknown-nested-key": (sub("max_concurrent: 1", "max_concurent: 1"), ("max_concurent",)),
        "unknown-domain": (sub(LR, "optim.lr: {logunifrom: [1.0e-4, 1.0e-2]}"), ("logunifrom",)),
        "reversed-bounds": (sub(LR, "optim.lr: {uniform: [0.01, 0.001]}"), ("optim.lr", "low")),
        "reversed log bounds": (sub(LR, "optim.lr: {loguniform: [1.0e-2, 1.0e-4]}"), ("optim.lr",)),
        "loguniform from 0": (sub(LR, "optim.lr: {loguniform: [0, 1.0e-2]}"), ("optim.lr",)),
        "infinite upper bound": (sub(LR, "optim.lr: {loguniform: [1.0e-4, .inf]}"), ("optim.lr", "finite|inf")),
        "nan bound": (sub(LR, "optim.lr: {uniform: [.nan, 1.0e-2]}"), ("optim.lr",)),
        "infinite choice": (sub(LR, "optim.lr: {choice: [.inf]}"), ("optim.lr",)),
        "empty choice": (sub(LR, "optim.lr: {choice: []}"), ("optim.lr",)),
        "three bounds": (sub(LR, "optim.lr: {uniform: [1, 2, 3]}"), ("optim.lr",)),
        "grid of 10^7 points": (sub(f"space:\n  {LR}", f"space: {{{GRID_10M}}}").replace(
            "search: {", "search: {algorithm: grid, "), ("grid",)),
        "not-a-field": (sub(LR, "optim.learning_rate: {choice: [0.001]}"), ("optim.learning_rate",)),
        "top-level-searched": (sub(LR, "seed: {choice: [0, 1]}"), ("seed", "top-level")),
        "bad-candidate": (sub(LR, "optim.lr: {choice: [-1.0, 0.001]}"), ("optim.lr",)),
        **_yaml_value_texts(fx),
        "unknown-method": (sub("device: cpu", "device: cpu, method.name: cleanclip"), ("cleanclip",)),
        "grid-with-range": (sub("num_samples: 1", "algorithm: grid, num_samples: 1"), ("grid",)),
        "two-model-sources": (sub("name: tiny-rn}", "name: tiny-rn, preset: demo}"), ("checkpoint",)),
        "no-data": (model + KEPT_EXTRA, ("data",)),
        "missing-checkpoint": (ok.replace(str(fx["model"]), str(fx["fx"] / "gone.safetensors")),
                               ("gone.safetensors", "not found")),
        "missing-eval-dir": (model + data(eval_dir=fx["fx"] / "gone-eval") + KEPT_EXTRA, ("gone-eval", "not found")),
        "unknown-attack": (ok + "attack: {name: badnt}\n", ("badnt",)),
        "unknown-model": (sub("name: tiny-rn}", "name: tiny-rnn}"), ("tiny-rnn",)),
        "model name contradicts card": (sub("name: tiny-rn}", "name: tiny-vit}"), ("tiny-vit", "tiny-rn")),
        "impossible-resources": (sub("cpu: 1}", "cpu: 64}"), ("resources",)),
        "csv-missing-column": (model + data(csv=fx["csv"]["nocaption"]) + KEPT_EXTRA, ("caption",)),
        "one-line secret CSV": (model + data(csv=fx["csv"]["secretline"]) + KEPT_EXTRA, ("secretline.csv",)),
        "target-not-a-class": (ok + "attack: {target: zebra}\n", ("zebra",)),
    }


def _yaml_value_texts(fx: dict[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Values of the wrong type or out of range."""
    model, data, ok, sub = _yaml_parts(fx)
    return {
        "wrong-type": (sub("epochs: 1", "epochs: three"), ("epochs",)),
        "epochs a list": (sub("epochs: 1", "epochs: [1]"), ("epochs",)),
        "epochs 0": (sub("epochs: 1", "epochs: 0"), ("epochs",)),
        "epochs infinite": (sub("epochs: 1", "epochs: .inf"), ("epochs",)),
        "num_samples 1.5": (sub("num_samples: 1", "num_samples: 1.5"), ("num_samples",)),
        "max_concurrent 0": (sub("max_concurrent: 1", "max_concurrent: 0"), ("max_concurrent",)),
        "threshold 1.5": (ok + "objective: {threshold: 1.5}\n", ("threshold",)),
        "threshold nan": (ok + "objective: {threshold: .nan}\n", ("threshold",)),
        "negative cpu": (sub("cpu: 1}", "cpu: -1}"), ("cpu",)),
        "batch_size 0": (model + data().replace("batch_size: 16", "batch_size: 0") + KEPT_EXTRA, ("batch_size",)),
    }


def yaml_cases(fx: dict[str, Any], work: Path) -> list[Case]:
    """Bad search-space files, each given to `cleansweep search` against the workdir of the finished sweep."""
    cases = []
    for i, (slug, (text, expect)) in enumerate(_yaml_texts(fx).items()):
        path = fx["fx"] / "yaml" / f"{slug.replace(' ', '-').replace('^', '')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {SECRET}\n{text}" if slug != "syntax" else text)
        cases.append(Case("YAML", slug, ["search", str(path), "--name", f"bad-{i}", "--workdir", str(work)], expect))
    return cases


def cli_cases(fx: dict[str, Any], work: Path) -> list[Case]:
    """Bad flags, names and resumes (against the finished sweep `kept`)."""
    kept = str(fx["fx"] / "yaml" / "kept.yaml")
    changed = fx["fx"] / "yaml" / "kept-changed.yaml"
    changed.write_text(Path(kept).read_text().replace("epochs: 1", "epochs: 2"))
    wd = ["--workdir", str(work)]
    out = str(fx["fx"] / "world")
    data = ["--train-csv", fx["world"]["train_csv"], "--eval-data", fx["world"]["eval_dir"]]
    name_rows = {"empty name": "", "name with a space": "a b", "name '..'": "..", "name of 101 characters": "x" * 101,
                 "name with a slash": "a/b", "name with a newline": "a\nb"}
    return [
        Case("CLI", "unknown command", ["frobnicate"], ("frobnicate",)),
        Case("CLI", "unknown flag", ["search", kept, "--epochs", "3", *wd], ("--epochs",)),
        Case("CLI", "--num-samples 0", ["search", kept, "--num-samples", "0", "--name", "n0", *wd], ("--num-samples",)),
        Case("CLI", "--threshold 5", ["report", "kept", "--threshold", "5", *wd], ("--threshold",)),
        Case("CLI", "pretrain without data", ["pretrain", "--name", "p", *wd], ("train_csv",)),
        Case("CLI", "--set without =", ["pretrain", *data, "--set", "epochs", *wd], ("epochs",)),
        Case("CLI", "--set of an unknown key", ["pretrain", *data, "--name", "p", "--set", "train.nope=1", *wd],
             ("nope",)),
        Case("CLI", "unknown knob", ["data", "demo", "--out", "w", "--knob", "nope=1"], ("nope",)),
        Case("CLI", "knob not a number", ["data", "demo", "--out", "w", "--knob", "noise=abc"], ("noise",)),
        Case("CLI", "demo world over another", ["data", "demo", "--out", out, "--n-eval", "60"], (out,)),
        Case("CLI", "--device cuda without GPU", ["evaluate", str(fx["model"]), "--eval-data",
                                                  fx["world"]["eval_dir"], *TRIGGER, "--device", "cuda"], ("cuda",)),
        Case("CLI", "--param without =", ["evaluate", str(fx["model"]), "--eval-data", fx["world"]["eval_dir"],
                                          *TRIGGER, "--device", "cpu", "--param", "alpha"], ("alpha",)),
        Case("CLI", "ui on a server URI", ["ui", "--tracking-uri", "http://127.0.0.1:9"], ("already",)),
        Case("CLI", "ui without a database", ["ui", "--workdir", str(fx["fx"] / "no-workdir")], ("mlflow.db",)),
        *[Case("name", what, ["search", kept, "--name", value, *wd], ("--name",)) for what, value in name_rows.items()],
        Case("name", "existing name without --resume", ["search", kept, "--name", "kept", *wd], ("kept", "--resume")),
        Case("resume", "--resume of an unknown sweep", ["search", kept, "--name", "nosuch", "--resume", *wd],
             ("nosuch",)),
        Case("resume", "--resume with a changed space", ["search", str(changed), "--name", "kept", "--resume", *wd],
             ("changed",)),
        Case("resume", "results of an unknown sweep", ["results", "nosuch", *wd], ("nosuch",)),
        Case("resume", "report of an unknown sweep", ["report", "nosuch", "--no-log", *wd], ("nosuch",)),
    ]


def uri_cases(fx: dict[str, Any], work: Path) -> list[Case]:
    """Tracking URIs that cannot work: refused in seconds, and nothing created where they point."""
    missing = [fx["fx"] / f"no-such-folder-{i}" for i in (1, 2)]  # one each: a row must not inherit another's
    sqlite_missing = [f"sqlite:///{m}/sub/mlflow.db" for m in missing]
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    remote = fx["fx"] / "yaml" / "kept-unreachable.yaml"
    remote.write_text((fx["fx"] / "yaml" / "kept.yaml").read_text() + f"mlflow: {{tracking_uri: '{closed}'}}\n")
    wd = ["--workdir", str(work)]
    return [
        Case("URI", "file-store tracking URI", ["results", "kept", "--tracking-uri", "file:///tmp/mlruns", *wd],
             ("file store",)),
        Case("URI", "unknown URI scheme", ["results", "kept", "--tracking-uri", "ftp://example/x", *wd], ("ftp",)),
        Case("URI", "results: unreachable server", ["results", "kept", "--tracking-uri", closed, *wd],
             ("127.0.0.1:9",), max_seconds=15),
        Case("URI", "report: unreachable server", ["report", "kept", "--no-log", "--tracking-uri", closed, *wd],
             ("127.0.0.1:9",), max_seconds=15),
        Case("URI", "search: unreachable server", ["search", str(remote), "--name", "uri-http", *wd],
             ("127.0.0.1:9",), max_seconds=30),
        Case("URI", "results: sqlite under a missing folder", ["results", "kept", "--tracking-uri", sqlite_missing[0]],
             ("no-such-folder",), check=_absent(missing[0])),
        Case("URI", "report: sqlite under a missing folder",
             ["report", "kept", "--no-log", "--tracking-uri", sqlite_missing[1]], ("no-such-folder",),
             check=_absent(missing[1])),
    ]


def _absent(path: Path) -> Callable[[], str | None]:
    return lambda: f"left {path.name} behind" if path.exists() else None


def _sixteen_bit_right(out: Path) -> Callable[[str], str | None]:
    """Accepting a 16-bit PNG is right only if its pixels were scaled to 8 bits (v >> 8), not clipped to white."""

    def check(stdout: str) -> str | None:
        import numpy as np
        import pandas as pd
        from PIL import Image

        try:
            table = out / json.loads((out / "manifest.json").read_text())["output_csv"]
            first = pd.read_csv(table, dtype=str).iloc[0]
            got = np.asarray(Image.open(table.parent / first["image"]).convert("L"), dtype=np.int32)
        except (OSError, ValueError, KeyError) as e:
            return f"accepted, but its output cannot be checked ({type(e).__name__})"
        size = got.shape[0]
        ramp = (np.arange(size * size).reshape(size, size) * 65535 // (size * size - 1)) >> 8
        wrong = int(np.abs(got[: size // 2] - ramp[: size // 2]).max())  # the top half: away from the corner patch
        return None if wrong <= 2 else f"accepted with wrong pixels (off by up to {wrong} of 255)"

    return check


def csv_cases(fx: dict[str, Any], scratch: Path) -> list[Case]:
    """Bad CSV files and rows, bad images and poison settings, given to `cleansweep poison` (every row triggered, so
    a bad image is met); a failed poisoning must leave no output folder behind."""
    c = fx["csv"]

    def poison(slug: str, csv: Any, expect: tuple[str, ...], *extra: str, area: str = "CSV", **kw: Any) -> Case:
        out = scratch / f"poison-{slug.replace(' ', '-')}"
        args = ["poison", "--csv", str(csv), "--out", str(out), "--image-size", "32", *extra]
        if "--num-poison" not in extra and "--fraction" not in extra:
            args += ["--fraction", "1"]
        return Case(area, slug, args, expect, _absent(out), **kw)

    good = fx["world"]["train_csv"]
    return [
        poison("missing CSV", fx["fx"] / "gone.csv", ("gone.csv", "not found")),
        poison("CSV is a folder", fx["fx"] / "csv", ("csv",)),
        poison("empty CSV file", c["empty"], ("empty",)),
        poison("header only, no rows", c["header"], ("header.csv",)),
        poison("one line holding a secret", c["secretline"], ("secretline.csv",)),
        poison("random bytes", c["garbage"], ("garbage.csv",)),
        poison("not UTF-8", c["binary"], ("binary.csv",)),
        poison("UTF-16", c["utf16"], ("utf16.csv",)),
        poison("ragged rows, unclosed quote", c["ragged"], ("ragged.csv",)),
        poison("missing caption column", c["nocaption"], ("caption",)),
        poison("missing image column", c["noimage"], ("image",)),
        poison("duplicate column", c["dupcolumns"], ("caption",)),
        poison("blank caption", c["blankcaption"], ("row 3", "caption")),
        poison("missing image", c["missingimage"], ("row 3", "gone.png")),
        poison("missing image, secret caption", c["secretcaption"], ("row 3", "gone.png")),
        poison("image path is a folder", c["dirimage"], ("row 3",), area="image"),
        poison("corrupt image", c["corruptimage"], ("row 3", "junk.png"), area="image"),
        poison("truncated image", c["truncatedimage"], ("row 3", "truncated.png"), area="image"),
        poison("zero-byte image", c["emptyimage"], ("row 3", "empty.png"), area="image"),
        poison("1.6 G pixels declared", c["bomb"], ("row 3", "bomb.png"), area="image"),
        poison("100 M pixels declared", c["warnbomb"], ("row 3", "warnbomb.png"), area="image"),
        poison("16-bit PNG", c["sixteenbit"], ("sixteen.png",), "--num-poison", "1", "--location", "fixed",
               "--patch-size", "4", area="image", accepted=_sixteen_bit_right(scratch / "poison-16-bit-PNG")),
        poison("--fraction 1.5", good, ("fraction",), "--fraction", "1.5"),
        poison("--fraction nan", good, ("fraction",), "--fraction", "nan"),
        poison("--num-poison above the rows", good, ("100000", "rows"), "--num-poison", "100000"),
        poison("unknown attack", good, ("badnt",), "--attack", "badnt"),
        poison("--param not a trigger parameter", good, ("nope",), "--param", "nope=1"),
        poison("--patch-size above the image", good, ("patch",), "--patch-size", "64"),
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
        Case("manifest", "--out is a file", ["poison", "--csv", good, "--out", str(fx["model"]), *same],
             ("model.safetensors",)),
    ]


def checkpoint_cases(fx: dict[str, Any]) -> list[Case]:
    """Bad checkpoint files given to `cleansweep evaluate`; the pickled command must never run."""
    k, eval_dir = fx["ckpt"], str(fx["world"]["eval_dir"])
    marker = k["evil.pt"].parent / "PWNED"

    def ev(slug: str, ckpt: Any, expect: tuple[str, ...], *extra: str, check: Any = None) -> Case:
        args = ["evaluate", str(ckpt), "--eval-data", eval_dir, "--device", "cpu", *TRIGGER, *extra]
        return Case("checkpoint", slug, args, expect, check)

    return [
        ev("missing checkpoint", fx["fx"] / "gone.safetensors", ("gone.safetensors",)),
        ev("pickle with code", k["evil.pt"], ("evil.pt", "weights_only"),
           check=lambda: "THE PICKLED COMMAND RAN" if marker.exists() else None),
        ev("TorchScript archive", k["script.pt"], ("TorchScript",)),
        ev("junk .safetensors", k["junk.safetensors"], ("junk.safetensors",)),
        ev("junk .pt (zip header)", k["junk.pt"], ("junk.pt",)),
        ev("zero-byte .safetensors", k["empty.safetensors"], ("empty.safetensors",)),
        ev("truncated .safetensors", k["truncated.safetensors"], ("truncated.safetensors",), "--model", "tiny-rn"),
        ev("list of tensors", k["list.pt"], ("no model weights",)),
        ev("NaN weight", k["nan.safetensors"], ("nan.safetensors", "finite|nan")),
        ev("infinite weight", k["inf.safetensors"], ("inf.safetensors", "finite|inf")),
        ev("weights of another model", k["vit.safetensors"], ("tiny-vit",), "--model", "tiny-rn"),
        ev("--model contradicts the card", fx["model"], ("tiny-vit", "tiny-rn"), "--model", "tiny-vit"),
        ev("card names another model than the weights", k["cardlies.safetensors"], ("tiny-vit",)),
        ev("a tensor of the wrong shape", k["resized.safetensors"], ("shape",), "--model", "tiny-rn"),
        ev("no card, not a known model", k["foreign.safetensors"], ("--model",)),
        ev("unreadable card", k["badcard.safetensors"], ("badcard.json",)),
        Case("checkpoint", "no trigger on the card nor the command line",
             ["evaluate", str(k["notrigger.safetensors"]), "--eval-data", eval_dir, "--device", "cpu"], ("--attack",)),
    ]


def _counts_images(expected: int) -> Callable[[str], str | None]:
    def check(stdout: str) -> str | None:
        try:
            seen = json.loads(stdout)["num_images"]
        except (ValueError, KeyError):
            return "accepted, but printed no num_images"
        return None if seen == expected else f"accepted, evaluated {seen} images of {expected} (hidden counted)"

    return check


def eval_cases(fx: dict[str, Any]) -> list[Case]:
    """Bad evaluation folders and targets given to `cleansweep evaluate` (a good checkpoint)."""
    e = fx["eval"]

    def ev(slug: str, folder: Any, expect: tuple[str, ...], *extra: str, **kw: Any) -> Case:
        args = ["evaluate", str(fx["model"]), "--eval-data", str(folder), "--device", "cpu", *TRIGGER, *extra]
        return Case("eval folder", slug, args, expect, **kw)

    return [
        ev("missing folder", fx["fx"] / "gone-eval", ("gone-eval", "not found")),
        ev("a file, not a folder", fx["model"], ("model.safetensors",)),
        ev("empty folder", e["empty"], ("empty",)),
        ev("no class subfolders", e["flat"], ("subfolder",)),
        ev("one class only", e["oneclass"], ("class",)),
        ev("a class without images", e["oneempty"], ("hold no images",)),
        ev("a class with only a text file", e["noimages"], ("image",)),
        ev("hidden folder beside the classes", e["hidden"], (".ipynb_checkpoints",),
           accepted=_counts_images(e["images"])),
        ev("corrupt image", e["corrupt"], ("zz-junk.png",)),
        ev("1.6 G pixels declared", e["bomb"], ("zz-bomb.png",)),
        ev("classnames.json not a mapping", e["badnames"], ("classnames.json",)),
        ev("templates without a {} slot", e["badtemplates"], ("templates.json",)),
        ev("target not a class", fx["world"]["eval_dir"], ("zebra",), "--target", "zebra"),
    ]
