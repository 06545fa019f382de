"""Bounds on user-given numbers, checked at the edge (flags, YAML, library entry points) before anything runs.

A number outside these bounds is a one-line refusal, never a traceback from deep inside numpy, torch or Ray, and
never a job that quietly asks for more memory than a machine has. `argparse` converters for every numeric flag of
the CLI live here too, so a bad flag takes argparse's own one-line error path.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2**32 - 1  # numpy's legacy RandomState (Optuna's samplers) and np.random.seed take 0..2**32-1 only
PORT_MAX = 65535
MAX_IMAGE_SIDE = 4096  # model resolutions are 224-448 px; a trigger or a demo image past this is a typo
MAX_BATCH = 65536
MAX_COUNT = 10**7  # demo-world images, subsets, steps, epochs, workers: past this a run is a typo, not a plan
MAX_STEPS = 10**6
MAX_WORKERS = 1024  # Ray workers or CPUs of one run
MAX_GRID_POINTS = 100_000  # default of search.max_grid_points: counted before a grid is expanded
# Decoded pixels of one input image (before resizing to the model resolution), checked on the file's header: 64 Mi
# pixels is 192 MiB as 8-bit RGB, an 8192 x 8192 photo. Pillow itself only warns below 2 x 89 MP and decodes a
# 144 MP file (1.4 GB). Read at call time, so a program may change it like PIL.Image.MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 64 * 2**20


def int_in(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """argparse `type=`: an integer in low..high; outside, argparse's one-line error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass one in {low}..{high}{what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; pass an integer in {low}..{high}{what}")
        return value

    parse.__name__ = "integer"
    parse.bounds = (low, high)  # type: ignore[attr-defined] - read by tests that walk every flag
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, what: str = "") -> Callable[[str], float]:
    """argparse `type=`: a finite float in [low, high] ((low, high] with `low_open`)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
        f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass one {span}{what}") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; pass a finite number {span}{what}")
        return value

    parse.__name__ = "number"
    parse.bounds = (low, high)  # type: ignore[attr-defined]
    return parse


seed = int_in(0, SEED_MAX, " (numpy and Optuna take seeds 0..2**32-1)")
port = int_in(1, PORT_MAX, " (a TCP port)")
count = int_in(1, MAX_COUNT)
image_side = int_in(1, MAX_IMAGE_SIDE, " pixels")
batch = int_in(1, MAX_BATCH)
steps = int_in(1, MAX_STEPS)
fraction = float_in(0.0, 1.0)
