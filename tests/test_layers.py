"""Layering (docs/design.md): imports between package modules only go down, and L0/L1 never pull in ray, mlflow, optuna.

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
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cleansweep

PACKAGE = Path(cleansweep.__file__).parent
# Floors, bottom first. L0 science and L1 behaviour up to `fit`; L2 drivers and adapters above it. A dotted name is
# one module of a package; a bare package name (data, methods, tracking) is the whole package, whose modules import
# each other freely. The same table, with what each floor is for, is in docs/design.md.
LEVELS = [
    ["errors", "limits", "runtime.layout", "runtime.atomic", "rng"],
    ["config", "objective", "tracking.outage", "tracking.tags", "runtime.storage"],
    ["tracking.store", "sweep.config", "sweep.names"],
    ["data", "augment", "attacks.params", "tracking.runs", "tracking.read", "tracking.server"],
    ["models", "losses", "attacks.noise", "attacks.structured", "tracking.trials", "tracking.registry"],
    ["attacks.registry"],
    ["attacks.poison", "evaluate", "attacks.badclip_objective", "detect.decree"],
    ["attacks.badclip", "detect.inversion", "experiments.presets", "methods", "optim", "attacks.poison_shards"],
    ["loop", "train_config", "detect.proxy", "experiments.scale"],
    ["train_data", "pretrain.options", "pretrain.selection"],
    ["fit", "sweep.space"],
    ["tracking", "runtime.scratch", "runtime.cluster", "runtime.interrupts", "runtime.diskguard", "sweep.delivery",
     "sweep.records"],
    ["results.analysis", "sweep.lifecycle"],
    ["results.tables"],
    ["results.figures", "sweep.trial"],
    ["results.report", "detect.scan", "sweep.optuna", "sweep.console", "sweep.outputs"],
    ["pretrain.worker"],
    ["pretrain.driver", "sweep.driver"],
    ["sweep.start", "search", "spaces", "diskguard"],
    ["experiments.study", "experiments.matrix"],
    ["cli"],
    ["__main__"],
]
# L0 science and L1 behaviour (and the pure tables of L2): never import ray, mlflow or optuna.
# tracking.* sit low (they import no cleansweep module) but belong to the one package that imports mlflow.
LOWER_LAYERS = [name for floor in LEVELS[:[i for i, f in enumerate(LEVELS) if "fit" in f][0] + 1] for name in floor
                if not name.startswith("tracking.")] + [
    "results.analysis", "results.tables", "results.figures"]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
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
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


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
def _module(path: Path) -> str:
    """Dotted name of a source file inside the package: sweep/driver.py -> sweep.driver, data/__init__.py -> data."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(name: str, floors: dict[str, int]) -> str | None:
    """The layering unit of a module: itself when it has a floor, else the closest package that has one."""
    while name not in floors and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in floors else None


def _imported_modules(path: Path) -> set[str]:
    """cleansweep modules a file imports anywhere (module level, inside functions, under TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cleansweep":
            base = node.module.removeprefix("cleansweep").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                out.add(sub if _exists(sub) else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("cleansweep.") for a in node.names if a.name.startswith("cleansweep.")}
    return out - {"", "__version__"}


def _floors() -> dict[str, int]:
    return {name: i for i, floor in enumerate(LEVELS) for name in floor}


def _sources() -> list[Path]:
    """Every source file but the package's own __init__ and the empty __init__ of packages without a floor."""
    return [p for p in sorted(PACKAGE.rglob("*.py")) if _module(p) and (p.name != "__init__.py"
                                                                        or _module(p) in _floors())]


def _violations(floors: dict[str, int]) -> list[str]:
    bad = []
    for path in _sources():
        unit = _unit(_module(path), floors)
        for target in sorted({_unit(m, floors) or m for m in _imported_modules(path)} - {unit}):
            if target not in floors or floors[target] >= floors[unit]:
                bad.append(f"{path.relative_to(PACKAGE)} ({unit}, floor {floors[unit]}) imports {target} "
                           f"(floor {floors.get(target, '?')})")
    return bad


def test_every_module_has_a_floor():
    floors = _floors()
    homeless = [_module(p) for p in PACKAGE.rglob("*.py") if _module(p) and _unit(_module(p), floors) is None
                and p.name != "__init__.py"]
    assert homeless == [], "place new modules in LEVELS"
    assert [name for name in floors if not _exists(name)] == [], "LEVELS names modules that do not exist"


def test_packages_without_a_floor_have_an_import_free_init():
    # sweep/__init__.py and friends only name their package: an import there would escape the floors above.
    inits = [p for p in PACKAGE.rglob("__init__.py") if _module(p) and _module(p) not in _floors()]
    assert inits and [p for p in inits if _imported_modules(p)] == []


def test_imports_only_go_down():
    assert _violations(_floors()) == []


def test_the_direction_check_catches_an_upward_import():
    # The same check with the sweep driver moved below tracking: its tracking import now points up, and is reported.
    floors = {**_floors(), "sweep.driver": _floors()["tracking"] - 1}
    assert any(v.startswith("sweep/driver.py") and v.endswith(f"imports tracking (floor {floors['tracking']})")
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


# ------------------------------------------------------------------------------------------------ module length
def _long_modules(limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{p.relative_to(PACKAGE)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


def test_no_module_over_400_lines():
    assert _long_modules() == []


def test_the_length_checks_catch_a_long_one():
    # Both checks can fail: with a limit of 5 lines, real modules and functions are reported.
    assert _long_modules(limit=5) and _long_functions(limit=5)


def test_the_design_page_lists_the_floors():
    # docs/design.md's floors table is the documentation of LEVELS: the same modules on the same floors.
    page = (PACKAGE.parent / "docs" / "design.md").read_text()
    page = page[page.index("| floor | modules |"):]
    page = page[: page.index("\n\n")]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", page, flags=re.M)
    documented = [sorted(re.findall(r"`([\w.]+)`", modules)) for _, modules in rows]
    assert documented == [sorted(floor) for floor in LEVELS]
