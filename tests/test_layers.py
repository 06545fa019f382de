"""Layering (DESIGN.md): imports between cleansweep modules only go down, and L0/L1 never pull in ray, mlflow, optuna.

1. `LEVELS` places every module of the package on a floor; an import (at the top of a file or inside a function,
   read from the source) may only name a module on a lower floor. Modules on the same floor stand side by side
   (`pretrain` and `search` do not import each other). A new module must be placed here deliberately.
2. One fresh interpreter preloads only third-party libraries the lower layers may use (torch, open_clip, ...),
   checks that none of them brought in a driver library, then forks one child per module: each child starts from
   that clean state, imports one cleansweep module and reports which driver libraries appeared. Forking keeps the
   cost of importing torch to once instead of once per module (~10 s each on a busy 2-core machine).
3. No function of the package is longer than 60 lines (its docstring not counted).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cleansweep

PACKAGE = Path(cleansweep.__file__).parent
LOWER_LAYERS = ["errors", "layout", "atomic", "limits", "outage", "stores", "config", "objective", "spaces", "data",
                "augment", "presets", "models", "losses", "triggers", "poison", "evaluate", "badclip", "scan",
                "methods", "optim", "loop", "session", "analysis", "figures"]
# Floors, bottom first. L0 science and L1 behaviour up to `session`; L2 drivers and adapters above it.
LEVELS = [
    ["errors", "layout", "atomic", "limits"],
    ["config", "objective", "outage"],
    ["stores"],
    ["spaces", "data", "augment"],
    ["models", "losses"],
    ["triggers"],
    ["poison", "evaluate"],
    ["badclip", "scan", "presets", "methods", "optim"],
    ["loop"],
    ["session"],
    ["tracking", "scratch", "cluster", "interrupts", "diskguard", "delivery", "tune_records"],
    ["analysis"],
    ["figures"],
    ["report"],
    ["pretrain", "search"],
    ["start_model"],
    ["study", "matrix"],
    ["cli"],
    ["__main__"],
]
MAX_FUNCTION_LINES = 60
FORBIDDEN = ["ray", "mlflow", "optuna"]
ALLOWED_PRELOAD = ["numpy", "torch", "torchvision", "open_clip", "PIL", "pydantic", "yaml", "pandas"]

PROBE = """
import importlib, json, os, sys, traceback
modules, forbidden, preload = json.loads(sys.argv[1]), set(json.loads(sys.argv[2])), json.loads(sys.argv[3])

def loaded():
    return sorted({m.split('.')[0] for m in sys.modules} & forbidden)

for lib in preload:
    importlib.import_module(lib)
results = {"(preload)": {"forbidden": loaded(), "error": None}}
for name in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            out = {"forbidden": loaded(), "error": None}
        except BaseException:
            out = {"forbidden": loaded(), "error": traceback.format_exc()[-3000:]}
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(out))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results[name] = json.loads(f.read() or '{"forbidden": [], "error": "child died"}')
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


def _exists(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def _probe(modules: list[str], preload: list[str] = ALLOWED_PRELOAD) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(modules), json.dumps(FORBIDDEN),
                           json.dumps(preload)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return _probe([f"cleansweep.{name}" for name in LOWER_LAYERS if _exists(name)])


def _params():
    for name in LOWER_LAYERS:
        if _exists(name):
            yield pytest.param(name, id=name)
        else:
            reason = f"cleansweep.{name} does not exist yet (no {name}.py or {name}/__init__.py)"
            yield pytest.param(name, id=f"{name}-not-written-yet", marks=pytest.mark.skip(reason=reason))


def test_preloaded_libraries_are_clean(results):
    assert results["(preload)"]["forbidden"] == []


@pytest.mark.parametrize("name", list(_params()))
def test_lower_layer_imports_no_driver_libraries(results, name):
    got = results[f"cleansweep.{name}"]
    assert got["error"] is None, f"importing cleansweep.{name} failed:\n{got['error']}"
    assert got["forbidden"] == [], f"cleansweep.{name} imports {got['forbidden']}"


def test_the_probe_detects_a_forbidden_import():
    # The check itself can fail: a module that pulls in optuna is reported, and its siblings are not affected.
    got = _probe(["optuna", "json"], preload=["json"])
    assert got["optuna"]["forbidden"] == ["optuna"] and got["json"]["forbidden"] == []


# ------------------------------------------------------------------------------------------------ import direction
def _unit(path: Path) -> str:
    """The layering unit of a source file: its module, or its subpackage (data/, methods/)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _imported_units(path: Path) -> set[str]:
    """cleansweep units a file imports anywhere (module level, inside functions, under TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cleansweep":
            parts = node.module.split(".")
            out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cleansweep.")}
    return out - {"__version__"}


def _floors() -> dict[str, int]:
    return {name: i for i, floor in enumerate(LEVELS) for name in floor}


def _violations(floors: dict[str, int]) -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for target in sorted(_imported_units(path) - {unit}):
            if target not in floors or floors[target] >= floors[unit]:
                bad.append(f"{path.relative_to(PACKAGE)} ({unit}, floor {floors[unit]}) imports {target} "
                           f"(floor {floors.get(target, '?')})")
    return bad


def test_every_module_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    floors = _floors()
    assert units - set(floors) == set(), "place new modules in LEVELS"
    assert set(floors) - units == set(), "LEVELS names modules that do not exist"


def test_imports_only_go_down():
    assert _violations(_floors()) == []


def test_the_direction_check_catches_an_upward_import():
    # The same check with search moved below tracking: search's tracking import now points up, and is reported.
    floors = {**_floors(), "search": _floors()["tracking"] - 1}
    assert any(v.startswith("search.py") and v.endswith(f"imports tracking (floor {floors['tracking']})")
               for v in _violations(floors))


# ------------------------------------------------------------------------------------------------ function length
def _long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = node.body[0]
            doc = (first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr)
                   and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str) else 0)
            lines = node.end_lineno - node.lineno + 1 - doc
            if lines > limit:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    return long


def test_no_function_over_60_lines():
    assert _long_functions() == []


def test_the_length_check_counts_lines():
    assert _long_functions(limit=5), "a 5-line limit must catch some function"
