"""Layering: every L0/L1 module imports without pulling in ray, mlflow or optuna (DESIGN.md).

One fresh interpreter preloads only third-party libraries the lower layers may use (torch, open_clip, ...), checks
that none of them brought in a driver library, then forks one child per module: each child starts from that clean
state, imports one cleansweep module and reports which driver libraries appeared. Forking keeps the cost of
importing torch to once instead of once per module (~10 s each on a busy 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cleansweep

PACKAGE = Path(cleansweep.__file__).parent
LOWER_LAYERS = ["config", "spaces", "poison", "augment", "data", "models", "losses", "evaluate", "objective",
                "methods", "optim", "loop", "session"]
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
