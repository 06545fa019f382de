"""Each registered method as a shipped search space runs it: the example values of the registry-wide tests.

A new method brings its YAML in search_spaces/; the contract tests (test_methods.py, test_session.py) take its
values from there, so they need no table of methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleansweep.methods.base import BaseMethodSpec
from cleansweep.sweep import space as spaces
from cleansweep.sweep.config import Domain

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _low(dom: Any) -> Any:
    """The first candidate of a searched parameter: a grid's or choice's first value, a range's low end."""
    return getattr(dom, dom.kind)[0] if isinstance(dom, Domain) else dom


def shipped_example(name: str) -> BaseMethodSpec:
    """Method `name` as a shipped search space runs it (`<name>.yaml` first, else the first space that uses it),
    each searched parameter at its first candidate: a registered method comes with its YAML."""
    files = sorted(SPACES.glob("*.yaml"), key=lambda p: (p.stem != name, p.name))
    for path in files:
        cfg = spaces.load(path)
        for params in spaces.variants(cfg).values():
            point = {k: _low(d) for k, d in params.items()}
            spec = spaces.trial_spec(spaces.base_train_dict(cfg), point)
            if spec.method.name == name:
                return spec.method
    raise AssertionError(f"no search space in {SPACES} uses method {name!r}; ship one ({name}.yaml)")
