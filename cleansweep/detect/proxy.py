"""An inverted trigger on disk (`save_inversion`, `load_inversion`: a .safetensors file and its JSON card) and back
as the proxy trigger `evaluate` measures an attack success rate with (`load_proxy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor

from cleansweep.detect.inversion import Trigger, checked_trigger, inverted_trigger
from cleansweep.errors import UserError
from cleansweep.models import card_path, file_sha256, read_card
from cleansweep.runtime.atomic import write_atomic, write_json

INVERSION_KIND = "cleansweep.inversion"


def save_inversion(path: str | Path, mask: Tensor, pattern: Tensor, meta: dict[str, Any]) -> Path:
    """Write `mask` and `pattern` to `path` (.safetensors) and a JSON card (`meta`, sha256) next to it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"inversion path {path} must end in .safetensors; rename it")
    mask, pattern = checked_trigger(mask, pattern, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mask": mask.cpu().contiguous(), "pattern": pattern.cpu().contiguous()}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata={"kind": INVERSION_KIND}))
    write_json(card_path(path), {**meta, "kind": INVERSION_KIND, "weights": path.name, "sha256": file_sha256(path)})
    return path


def load_inversion(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read an inverted trigger written by `save_inversion` (never executes code).

    Returns:
        (mask (1, H, W), pattern (3, H, W), card dict; {} when the card is missing).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"inverted trigger not found: {path}; pass the inversion.safetensors written by scan")
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); run scan again") from None
    if set(tensors) != {"mask", "pattern"}:
        raise UserError(f"{path}: expected tensors 'mask' and 'pattern', got {', '.join(sorted(tensors))}; "
                        "pass the inversion.safetensors written by scan")
    mask, pattern = checked_trigger(tensors["mask"], tensors["pattern"], str(path))
    return mask, pattern, read_card(path)


def load_proxy(path: str | Path, classnames: Sequence[str]) -> tuple[Trigger, int]:
    """The inverted trigger of a scan and the index of its suspected target among `classnames`, for `evaluate`."""
    mask, pattern, card = load_inversion(path)
    name = card.get("suspected_target")
    if name not in classnames:
        raise UserError(f"{path}: suspected target {name!r} is not a class of this evaluation set; scan the model "
                        "on the folder you evaluate on")
    return inverted_trigger(mask, pattern), list(classnames).index(name)

