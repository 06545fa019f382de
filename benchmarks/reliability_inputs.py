"""Reliability part `inputs`: every bad input of the table through the CLI, judged as a user would: exit 2, one
stderr line `error: <problem>; <fix>`, no traceback, the problem and a fix named, no secret from the file echoed,
nothing written (sha256 of the protected folders before and after, and nothing new in the command's folder)."""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reliability_cases import checkpoint_cases, cli_cases, csv_cases, eval_cases, manifest_cases, uri_cases, yaml_cases
from reliability_common import Ran, digest_changes, markdown, run_cli, run_guarded, tree_digest
from reliability_fixtures import SECRET, Case, finished_sweep, input_fixtures
from reliability_flags import flag_cases

FIX = re.compile(r"\b(pass|use|choose|set|add|remove|rename|fix|drop|delete|give|write|check|point|quote|lower|ask|"
                 r"replace|shrink|raise|export|re-save|re-download|resume|should|must|needs?|see|try|put|restore|start|fill|"
                 r"name one|connect|e\.g\.)(?!\w)", re.IGNORECASE)


@dataclass
class Outcome:
    case: Case
    code: int | None
    message: str
    lines: int
    traceback: bool
    secret: bool
    seconds: float
    wrote: str | None
    problems: list[str] = field(default_factory=list)


def _names(message: str, word: str) -> bool:
    return any(alt.lower() in message.lower() for alt in word.split("|"))


def judge(case: Case, ran: Ran, wrote: str | None, timeout: float) -> Outcome:
    """Apply the criteria: exit 2, one stderr line 'error: ...', no traceback, problem and fix named, no secret
    echoed, nothing changed on disk, within the case's time bound, the case's own check. A case with `accepted`
    may instead exit 0 with a right result."""
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("error: ")), lines[0] if lines else "")
    out = Outcome(case, ran.code, message, len(lines), "Traceback" in ran.stderr + ran.stdout,
                  SECRET in ran.stderr + ran.stdout, ran.seconds, wrote)
    if ran.code is None:
        out.problems.append(f"still running after {timeout:.0f} s (the input was accepted)")
    elif ran.code == 0 and case.accepted is not None:
        out.message = "(accepted: exit 0)"
        out.problems += [p for p in [case.accepted(ran.stdout)] if p]
    else:
        out.problems += _refusal_problems(case, ran, lines, message)
    if out.traceback:
        out.problems.append("traceback")
    if out.secret:
        out.problems.append("echoed the file's contents")
    if case.max_seconds is not None and ran.seconds > case.max_seconds:
        out.problems.append(f"took {ran.seconds:.0f} s (> {case.max_seconds:.0f} s)")
    if wrote:
        out.problems.append(f"wrote: {wrote}")
    handled = ran.code == 0 and case.accepted is not None  # its output is what it was asked for: not a leftover
    extra = case.check() if case.check and not handled else None
    if extra:
        out.problems.append(extra)
    return out


def _refusal_problems(case: Case, ran: Ran, lines: list[str], message: str) -> list[str]:
    problems = []
    if ran.code != 2:
        problems.append(f"exit {ran.code}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} stderr lines")
    missing = [w for w in case.expect if not _names(message, w)]
    if missing:
        problems.append(f"does not name {missing}")
    if not FIX.search(message):
        problems.append("no fix")
    return problems
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


def new_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_case(i: int, case: Case, env: dict[str, str], scratch: Path, timeout: float) -> tuple[Ran, list[str]]:
    """Run one case in its own empty folder; what it left in that folder (a refusal leaves nothing)."""
    cwd = scratch / f"{i:03d}"
    cwd.mkdir(parents=True)
    ran = run_guarded([str(a) for a in case.args], env, cwd, timeout)
    left = new_files(cwd)
    (cwd.parent / f"{i:03d}.out").write_text(f"exit {ran.code}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}")
    return ran, left


def all_cases(fx: dict[str, Any], work: Path, scratch: Path) -> list[Case]:
    return (yaml_cases(fx, work) + cli_cases(fx, work) + uri_cases(fx, work) + flag_cases(fx, work, scratch)
            + csv_cases(fx, scratch) + manifest_cases(fx) + checkpoint_cases(fx) + eval_cases(fx))


def run_inputs(root: Path, env: dict[str, str], *, timeout: float = 60, match: str | None = None) -> dict[str, Any]:
    """Part `inputs`: every bad input through the CLI (those whose area or name contains `match`), judged by
    `judge`; prints the table."""
    root = root / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    fx = input_fixtures(root)
    work = finished_sweep(root, fx, env)
    scratch = root / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    cases = [c for c in all_cases(fx, work, scratch) if not match or match.lower() in f"{c.area} {c.what}".lower()]
    controls = _controls(fx, work, env, root)
    protected = [fx["fx"], work]
    before, runs_before = tree_digest(protected), store_runs(work)
    outcomes = []
    for i, case in enumerate(cases, 1):
        ran, left = run_case(i, case, env, scratch / "runs", timeout)
        after, runs_after = tree_digest(protected), store_runs(work)
        changes = digest_changes(before, after)
        wrote = [describe(changes, runs_before, runs_after, root)] if changes else []
        wrote += [f"{len(left)} files in its folder ({', '.join(left[:2])})"] if left else []
        outcome = judge(case, ran, "; ".join(wrote) or None, timeout)
        before, runs_before = after, runs_after  # the next case starts from what this one left
        outcomes.append(outcome)
        print(f"[{i}/{len(cases)}] {case.area}: {case.what}: {'ok' if not outcome.problems else outcome.problems}",
              file=sys.stderr, flush=True)
    return _inputs_summary(outcomes, controls, root)


def _inputs_summary(outcomes: list[Outcome], controls: list[str], root: Path) -> dict[str, Any]:
    def short(text: str) -> str:
        return text.replace(str(root), "$W")

    def verdict(o: Outcome) -> str:
        return "ok" if not o.problems else "FAIL: " + short("; ".join(o.problems))

    rows = [[i, o.case.area, o.case.what, "-" if o.code is None else o.code, o.lines, "yes" if o.traceback else "no",
             "YES" if o.secret else "no", short(o.wrote or "nothing"), f"{o.seconds:.1f}",
             short(o.message).removeprefix("error: "), verdict(o)] for i, o in enumerate(outcomes, 1)]
    print(markdown(["#", "area", "bad input", "exit", "stderr lines", "traceback", "secret echoed", "written",
                    "s", "message (after `error: `)", "verdict"], rows))
    print()
    for line in controls:
        print(f"- {line}")
    failing = [r for r, o in zip(rows, outcomes, strict=True) if o.problems]
    by_area = Counter(o.case.area for o in outcomes)
    fails = Counter(o.case.area for o in outcomes if o.problems)
    print("\n" + markdown(["area", "rows", "pass", "fail"],
                          [[a, n, n - fails[a], fails[a]] for a, n in by_area.items()]))
    print(f"\n**{len(rows) - len(failing)} of {len(rows)} bad inputs pass** (exit 2, one `error:` line, no traceback, "
          "problem and fix named, no secret echoed, nothing on disk changed)")
    for r in failing:
        print(f"- FAIL #{r[0]} {r[1]}: {r[2]}: {r[-1].removeprefix('FAIL: ')}")
    return {"passed": len(rows) - len(failing), "cases": len(rows), "controls": controls,
            "failing": [f"#{r[0]} {r[1]}: {r[2]}" for r in failing],
            "rows": [dict(zip(["n", "area", "input", "exit", "stderr_lines", "traceback", "secret", "written", "s",
                               "message", "verdict"], r, strict=True)) for r in rows]}
