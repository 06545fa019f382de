"""The trigger registry (`TRIGGERS`): every trigger by name, how its parameters are read, checked and resolved.

Triggers: the classic noise/warp ones (`cleansweep.attacks.noise`: badnet, blended, sig, wanet), structured ones
(`cleansweep.attacks.structured`: stripes, triangle, text) and badclip, which pastes a patch optimised on a CLIP
model (`cleansweep.attacks.badclip`) and whose entry lives here, with the reading of its patch file. Each entry
declares its parameters' defaults and kinds (`cleansweep.attacks.params`). `resolve_trigger_params` turns every
derived default into a concrete value, so a manifest's `trigger_params` rebuild the very same trigger.
`cleansweep.attacks.poison` writes poisoned data with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError

from cleansweep.attacks import noise, structured
from cleansweep.attacks.params import LOCATION, SIZE, TEXT, Trigger, TriggerFn, check_param, default_patch_size
from cleansweep.attacks.structured import patch_positions, stamp
from cleansweep.config import AttackSpec
from cleansweep.errors import UserError
from cleansweep.models import file_sha256


# ------------------------------------------------------------------------------------------------ badclip
def badclip(raw: torch.Tensor, generator: torch.Generator, *, pattern: str, pattern_sha256: str | None = None,
            patch_size: int | None = None, location: str = "random") -> torch.Tensor:
    """BadCLIP: paste an optimised patch (a `cleansweep.attacks.badclip.save_patch` file) at `location`, as BadNet.

    Args:
        raw: (B, 3, H, W) in [0, 1].
        generator: draws the positions (`location="random"`).
        pattern: path of the patch's .safetensors file (loaded once per path, size and mtime).
        pattern_sha256: the file's expected sha256 (manifests record it); a different file is an error.
        patch_size: the patch's side; None: whatever the file holds.
        location: "random" or "fixed" (bottom-right).
    """
    patch, sha = cached_patch(pattern)
    if pattern_sha256 is not None and sha != pattern_sha256:
        raise UserError(f"pattern {pattern} changed (sha256 {sha[:12]}..., expected {pattern_sha256[:12]}...); "
                        "restore the file the data was poisoned with")
    if patch_size is not None and patch.shape[-1] != patch_size:
        raise UserError(f"pattern {pattern} is {patch.shape[-1]} px but patch_size is {patch_size}; drop patch_size "
                        "or optimise a patch of that size")
    b, _, h, w = raw.shape
    rows, cols = patch_positions(b, h, w, patch.shape[-2], patch.shape[-1], location, generator)
    return stamp(raw, patch.to(raw.dtype), rows, cols)


def validate_patch(patch: Any, where: str) -> torch.Tensor:
    """`patch` if it is a (3, p, p) tensor of finite values in [0, 1]; UserError naming `where` otherwise."""
    square = isinstance(patch, torch.Tensor) and patch.ndim == 3 and patch.shape[0] == 3 and \
        patch.shape[1] == patch.shape[2] > 0
    if not square or not torch.isfinite(patch).all() or patch.min() < 0 or patch.max() > 1:
        shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__
        raise UserError(f"{where}: a patch must be a (3, p, p) tensor of values in [0, 1], got {shape}; save it with "
                        "cleansweep.attacks.badclip.save_patch")
    return patch


@lru_cache(maxsize=16)
def _read_patch(path: str, size: int, mtime_ns: int) -> tuple[torch.Tensor, str]:
    # Keyed by size and mtime too: a rewritten file is read again, an unchanged one once per process.
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({first}); pass a patch written by "
                        "cleansweep.attacks.badclip.save_patch") from None
    if "patch" not in tensors:
        raise UserError(f"{path}: no 'patch' tensor (found: {', '.join(tensors) or 'none'}); pass a patch written by "
                        "cleansweep.attacks.badclip.save_patch")
    return validate_patch(tensors["patch"].float(), path), file_sha256(path)


def cached_patch(path: str | Path) -> tuple[torch.Tensor, str]:
    """(patch (3, p, p), sha256 of the file) of a badclip pattern file, read once per path, size and mtime.

    The tensor is shared: do not modify it (`cleansweep.attacks.badclip.load_patch` returns a copy).

    Raises:
        UserError: not a .safetensors path, missing, unreadable, or not a (3, p, p) patch in [0, 1]. Nothing is
            ever unpickled.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        raise UserError(f"pattern {p} is not a .safetensors file; pass a patch written by cleansweep.attacks.badclip."
                        "save_patch (pickled files are never loaded)")
    if not p.is_file():
        raise UserError(f"pattern file not found: {p}; pass the path of a .safetensors patch")
    st = p.stat()
    return _read_patch(str(p.resolve()), st.st_size, st.st_mtime_ns)

def _resolve_badclip(params: dict[str, Any], image_size: int) -> dict[str, Any]:
    p = dict(params)
    if p["pattern"] is None:
        raise UserError("badclip needs its patch file: pass pattern=PATCH.safetensors (--param pattern=...) or "
                        "optimise one with --optimise-on CHECKPOINT")
    patch, sha = cached_patch(p["pattern"])
    if p["pattern_sha256"] is not None and p["pattern_sha256"] != sha:
        raise UserError(f"pattern {p['pattern']} has sha256 {sha[:12]}..., not the expected "
                        f"{p['pattern_sha256'][:12]}...; pass the file the data was poisoned with")
    p["pattern_sha256"] = sha
    side = patch.shape[-1]
    if p["patch_size"] is not None and int(p["patch_size"]) != side:
        raise UserError(f"pattern {p['pattern']} is a {side} px patch, not patch_size {p['patch_size']}; drop "
                        "patch_size or optimise a patch of that size")
    p["patch_size"] = side
    return p


BADCLIP = Trigger("badclip", badclip, "optimised patch from a file (cleansweep.attacks.badclip; BadCLIP, Liang et "
                  "al. 2024), random or bottom-right position",
                  {"pattern": None, "pattern_sha256": None, "patch_size": None, "location": "random"},
                  {"pattern": TEXT, "pattern_sha256": TEXT, "patch_size": SIZE, "location": LOCATION}, _resolve_badclip)
TRIGGERS: dict[str, Trigger] = {entry.name: entry for entry in (*noise.ENTRIES, *structured.ENTRIES, BADCLIP)}


# ------------------------------------------------------------------------------------------------ parameters
def list_triggers() -> list[str]:
    """The names of every registered trigger."""
    return list(TRIGGERS)


def parse_trigger_param(item: str) -> tuple[str, Any]:
    """('key', value) of a 'KEY=VALUE' trigger parameter (`--param`), the value read as YAML ('0.3' -> 0.3).

    A value YAML reads as nothing but that is not empty or 'null' ('#ff0000' is a YAML comment) stays text.

    Raises:
        UserError: no '=', an empty key, unreadable YAML, or a list/mapping value.
    """
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise UserError(f"--param {item!r} must look like KEY=VALUE, e.g. --param alpha=0.3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--param {item!r}: the value is not readable YAML ({first}); quote it") from None
    if value is None and text.strip() not in ("", "~", "null", "Null", "NULL"):
        value = text.strip()
    if value is not None and not isinstance(value, bool | int | float | str):
        raise UserError(f"--param {item!r}: the value must be a number, a word or true/false, not a "
                        f"{type(value).__name__}; pass one value per --param")
    return key, value


def resolve_trigger_params(name: str, image_size: int, **params: Any) -> dict[str, Any]:
    """The trigger's effective parameters: defaults filled in, checked, as recorded in manifests.

    Parameters of *other* triggers are tolerated when unset (None) or at their default, so callers can pass one
    attack configuration (patch_size, location, patch) whatever the attack; a set value that does not apply is an
    error. Derived defaults (sizes from the image size, colours and phases from `trigger_seed`, a pattern's sha256)
    are resolved to concrete values, so the result never holds None and rebuilds the same trigger.
    """
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose from: {', '.join(TRIGGERS)}")
    entry = TRIGGERS[name]
    out = dict(entry.defaults)
    for key, value in params.items():
        if key in entry.defaults:
            if value is not None:
                out[key] = check_param(entry, key, value)
            continue
        owners = [n for n, t in TRIGGERS.items() if key in t.defaults]
        if not owners:
            raise UserError(f"unknown trigger parameter {key!r}; pass one that {name} takes: "
                            f"{', '.join(entry.defaults)}")
        if value is not None and all(value != TRIGGERS[n].defaults[key] for n in owners):
            raise UserError(f"trigger parameter {key!r} applies to {', '.join(owners)}, not {name}; drop it")
    for key, kind in entry.kinds.items():
        if kind.choices and out[key] not in kind.choices:
            raise UserError(f"{key} {out[key]!r} is not valid for {name}; choose from: {', '.join(kind.choices)}")
    if entry.resolve is not None:
        out = entry.resolve(out, image_size)
    if "patch_size" in out:
        out["patch_size"] = default_patch_size(image_size) if out["patch_size"] is None else int(out["patch_size"])
        if not 1 <= out["patch_size"] <= image_size:
            raise UserError(f"patch_size {out['patch_size']} must be in 1..{image_size} (the image size)")
    return out


def create_trigger(name: str, image_size: int, **params: Any) -> TriggerFn:
    """A trigger function `fn(raw (B, 3, S, S), generator) -> raw` with its parameters bound (see TRIGGERS).

    The result is a `functools.partial`; its `.keywords` are the effective parameters.

    Raises:
        UserError: unknown attack ("unknown attack 'x'; choose from: ...") or parameter, or a bad value.
    """
    resolved = resolve_trigger_params(name, image_size, **params)
    return partial(TRIGGERS[name].apply, **resolved)


ATTACK_FIELDS = ("patch_size", "location", "patch", "trigger_seed")  # trigger parameters AttackSpec names itself


def attack_trigger(attack: AttackSpec, image_size: int) -> TriggerFn:
    """The trigger an `AttackSpec` describes, every per-run parameter (`trigger_seed` too) passed through."""
    named = {key: getattr(attack, key) for key in ATTACK_FIELDS}
    return create_trigger(attack.name, image_size, **named, **attack.params)


def attack_from_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The `AttackSpec` values (a dict) of the trigger a poison manifest recorded: name, target, every parameter."""
    params = dict(manifest.get("trigger_params") or {})
    named = {key: params.pop(key) for key in ATTACK_FIELDS if key in params}
    return {"name": manifest["attack"], "target": manifest["target"], **named, "params": params}


