"""What a trigger is to the registry: its entry (`Trigger`) and the kinds of value its parameters take (`Kind`).

Every trigger declares, next to its function, the kind of each of its parameters; `check_param` checks a value
against the kind before the trigger sees it, and an entry whose parameters lack a declared kind is refused when it
is built. The entries themselves live with their triggers (`cleansweep.attacks.noise`, `.structured`,
`.registry`); `cleansweep.attacks.registry.TRIGGERS` collects them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cleansweep.errors import UserError
from cleansweep.limits import MAX_IMAGE_SIDE, SEED_MAX

TriggerFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_WHAT = {"integer": "an integer", "number": "a number", "text": "a non-empty text"}


@dataclass(frozen=True)
class Kind:
    """The values a trigger parameter takes: an integer in [low, high], a finite number, or a non-empty text
    (one of `choices` when given)."""

    name: str
    low: int = 0
    high: int = MAX_IMAGE_SIDE
    choices: tuple[str, ...] = ()


SEED = Kind("integer", 0, SEED_MAX)  # a seed torch cannot take is refused here, not deep inside a trigger
SIZE = Kind("integer", 1, MAX_IMAGE_SIDE)  # sizes and grids past an image side allocate gigabytes
NUMBER = Kind("number")
TEXT = Kind("text")
LOCATION = Kind("text", choices=("random", "fixed"))


@dataclass(frozen=True)
class Trigger:
    """A registry entry: the trigger's name, its function, what it does, its parameters' defaults (None = derived:
    from the image size, the seed or a file) and kinds, and an optional `resolve(params, image_size) -> params`
    that derives and checks them.

    Raises:
        UserError: a parameter without a declared kind, a kind for a parameter it does not take, or a kind that is
            not one of integer, number, text.
    """

    name: str
    apply: Callable[..., torch.Tensor]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, Kind] = field(default_factory=dict)
    resolve: Callable[[dict[str, Any], int], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        undeclared = [key for key in self.defaults if key not in self.kinds]
        if undeclared:
            raise UserError(f"trigger {self.name!r} does not declare the kind of its parameter(s) "
                            f"{', '.join(undeclared)}; add them to its kinds")
        unused = [key for key in self.kinds if key not in self.defaults]
        if unused:
            raise UserError(f"trigger {self.name!r} declares kinds for {', '.join(unused)}, which it does not take; "
                            "give them a default or drop them")
        unknown = [f"{key}={kind.name}" for key, kind in self.kinds.items() if kind.name not in _WHAT]
        if unknown:
            raise UserError(f"trigger {self.name!r} has parameters of unknown kind ({', '.join(unknown)}); use one "
                            f"of: {', '.join(_WHAT)}")


def default_patch_size(image_size: int) -> int:
    """BadNet patch side: 16 px at 224 px (the papers' setting), scaled to the model resolution, at least 1."""
    return max(1, round(16 * image_size / 224))


def check_range(name: str, key: str, value: Any, low: float, high: float = math.inf) -> float:
    """`value` when low <= value <= high; UserError naming the trigger `name` and parameter `key` otherwise."""
    if not low <= value <= high:
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise UserError(f"{name} parameter {key}={value!r} must be {span}; pass another value")
    return value


def check_param(entry: Trigger, key: str, value: Any) -> Any:
    """`value` as the kind `entry` declares for `key` (an integral float becomes an int); UserError otherwise.

    Choices are checked later, on the effective parameters (`cleansweep.attacks.registry.resolve_trigger_params`).
    """
    kind = entry.kinds[key]
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    if kind.name == "integer" and number and math.isfinite(value) and float(value).is_integer():
        if not kind.low <= int(value) <= kind.high:
            raise UserError(f"{entry.name} parameter {key}={int(value)} must be in {kind.low}..{kind.high}")
        return int(value)
    if kind.name == "number" and number and math.isfinite(value):
        return value if isinstance(value, int | float) else float(value)
    if kind.name == "text" and isinstance(value, str) and value.strip():
        return value
    default = entry.defaults.get(key)
    example = f"; e.g. {key}={default}" if default is not None else ""
    raise UserError(f"{entry.name} parameter {key}={value!r} must be {_WHAT[kind.name]}{example}")
