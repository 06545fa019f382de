"""Zero-shot accuracy and attack success rate (ASR) in one pass over an evaluation set.

ASR follows the paper's code (CleanCLIP's released code measured accuracy on triggered images instead): the
fraction of triggered images whose true class is NOT the target that are classified as the target. Triggers are
applied to raw [0, 1] images before normalisation, with a generator seeded per evaluation, so every evaluation of
a run sees the same triggered set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleansweep.attacks.registry import ATTACK_FIELDS, attack_from_manifest, attack_trigger, resolve_trigger_params
from cleansweep.config import AttackSpec
from cleansweep.errors import UserError
from cleansweep.models import file_sha256, load_checkpoint_model, read_card
from cleansweep.objective import ASR, TOP1, TOP5

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]]
Trigger = Callable[[Tensor, torch.Generator], Tensor]
NO_ATTACK = "none"  # attack.name when the trigger is unknown (a sweep constrained on the proxy ASR only)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a UserError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; pass --device cpu or auto")
    return device


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class EvalMode:
    """Put a module in eval mode and restore its previous mode (train or eval) afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def zeroshot_classifier(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                        templates: Sequence[str | Callable[[str], str]], device: str | torch.device) -> Tensor:
    """Zero-shot classifier weights: per class, the mean of its L2-normalised template embeddings, re-normalised.

    Args:
        model: a CLIP model with `encode_text(tokens, normalize=True)`.
        tokenizer: maps a list of strings to (N, L) tokens.
        classnames: readable class names.
        templates: format strings with one '{}' (or callables) producing a prompt from a class name.
        device: where to compute.

    Returns:
        (D, C) tensor on `device`; column c is class c.
    """
    module = unwrap(model)
    with EvalMode(module), torch.inference_mode():
        # open_clip's builder batches classes x all templates into one text forward.
        return open_clip.build_zero_shot_classifier(module, tokenizer, list(classnames), list(templates),
                                                    num_classes_per_batch=max(1, 1024 // len(templates)),
                                                    device=device)


def normalizer(normalize: Normalize) -> Callable[[Tensor], Tensor]:
    if callable(normalize):
        return normalize
    mean, std = normalize
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: (x - mean_t.to(x)) / std_t.to(x)


def _predict(module: nn.Module, images: Tensor, classifier: Tensor, k: int, amp: bool) -> Tensor:
    """(B, k) class indices, best first; bf16 autocast on CUDA when `amp` (as the training forward pass)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and images.device.type == "cuda"):
        features = F.normalize(module.encode_image(images).float(), dim=-1)
    return (features @ classifier.to(features.dtype)).topk(k, dim=-1).indices


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The trigger's generator for one evaluation batch: a function of (seed, batch number) alone, so a batch is
    triggered the same way whichever process evaluates it (ranks split the batches) and at every evaluation."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))


def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], classifier: Tensor, *, normalize: Normalize,
             target_index: int, trigger: Trigger | None = None, seed: int = 0, device: str | torch.device = "cpu",
             max_images: int | None = None, extra_triggers: Mapping[str, tuple[Trigger, int]] | None = None,
             amp: bool = False, rank: int = 0, world: int = 1) -> dict[str, float | int]:
    """Zero-shot top-1/top-5 and ASR in one pass, without gradients; the model's train/eval mode is restored.

    Args:
        model: a CLIP model with `encode_image` (DDP wrappers are unwrapped).
        loader: yields `(raw_images (B, 3, S, S) in [0, 1], labels (B,))`, the same batches in every process.
        classifier: (D, C) from `zeroshot_classifier`.
        normalize: callable on raw image batches, or `(mean, std)` per channel.
        target_index: label of the attack target class.
        trigger: `trigger(raw_images, generator) -> raw_images`; None skips the ASR.
        seed: seeds the trigger's generator of each batch (same triggered set at every evaluation).
        device: where to compute.
        max_images: stop after this many images (single process only).
        extra_triggers: more ASRs measured in the same pass, by metric name: `(trigger, its target index)` (e.g.
            `proxy_asr_top1` with the trigger `cleansweep scan` inverted and the class it suspects).
        amp: bf16 autocast of the image tower on CUDA.
        rank, world: this process evaluates batches rank, rank + world, ...; the counts are summed over the
            initialised process group, so every rank returns the whole set's metrics (the same as one process).

    Returns:
        `zeroshot_top1`, `zeroshot_top5` (top-min(5, C)), `asr_top1` (NaN when there is no trigger or no
        non-target image), `num_images`, `num_asr_images` (non-target images that were triggered), and one value
        per extra trigger.
    """
    if world > 1 and max_images is not None:
        raise ValueError("max_images is for single-process evaluation")
    attacks = {ASR: (trigger, target_index)} if trigger is not None else {}
    attacks.update(extra_triggers or {})
    counts = _counts(unwrap(model), loader, classifier.to(device), attacks, normalizer(normalize), seed,
                     torch.device(device), max_images, amp, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    seen, top1, topk = (int(x) for x in counts[:3])
    hits = dict(zip(attacks, counts[3::2].tolist(), strict=True))
    triggered = dict(zip(attacks, counts[4::2].tolist(), strict=True))
    nan = float("nan")
    out = {TOP1: top1 / seen if seen else nan, TOP5: topk / seen if seen else nan, ASR: nan, "num_images": seen,
           "num_asr_images": int(triggered.get(ASR, 0))}
    return {**out, **{name: hits[name] / triggered[name] if triggered[name] else nan for name in attacks}}


def _counts(module: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], classifier: Tensor,
            attacks: Mapping[str, tuple[Trigger, int]], norm: Callable[[Tensor], Tensor], seed: int,
            device: torch.device, max_images: int | None, amp: bool, rank: int, world: int) -> Tensor:
    """[images, top-1 hits, top-k hits, then per attack: target hits, triggered images] of this rank's batches."""
    k = min(5, classifier.shape[1])
    counts = torch.zeros(3 + 2 * len(attacks), dtype=torch.float64)
    with EvalMode(module), torch.inference_mode():
        for batch, (raw, labels) in enumerate(loader):
            if batch % world != rank:
                continue
            if max_images is not None:
                raw, labels = raw[: max_images - int(counts[0])], labels[: max_images - int(counts[0])]
            if len(labels) == 0:
                break
            labels = torch.as_tensor(labels).to(device)
            pred = _predict(module, norm(raw.to(device)), classifier, k, amp)
            counts[:3] += torch.tensor([len(labels), int((pred[:, 0] == labels).sum()),
                                        int((pred == labels[:, None]).any(dim=1).sum())], dtype=torch.float64)
            for i, (fn, target) in enumerate(attacks.values()):
                others = (labels != target).cpu()
                if others.any():
                    triggered = fn(raw[others].cpu(), batch_generator(seed, batch))
                    hit = _predict(module, norm(triggered.to(device)), classifier, 1, amp)[:, 0] == target
                    counts[3 + 2 * i: 5 + 2 * i] += torch.tensor([int(hit.sum()), int(others.sum())],
                                                                 dtype=torch.float64)
            if max_images is not None and counts[0] >= max_images:
                break
    return counts


def recorded_attack(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The trigger a checkpoint's card records: its own `attack` (training checkpoints), else the attack of the
    run that made it (`config.train.attack`, pre-training's selected model); None when it records none."""
    attack = card.get("attack") or ((card.get("config") or {}).get("train") or {}).get("attack")
    return dict(attack) if isinstance(attack, Mapping) else None


# How a command's user names the trigger, for messages: `cleansweep evaluate`'s flags or a sweep file's `attack:`.
_WORDS = {
    "flags": {"manifest": "--poison-manifest", "given": "flags",
              "name": "--attack NAME with its --patch-size/--location/--patch/--trigger-seed/--param as poisoned",
              "mismatch": "pass the manifest the model was poisoned with, or set the trigger with flags (--attack ... "
                          "--trigger-seed ...) and no --poison-manifest"},
    "file": {"manifest": "attack.manifest", "given": "file",
             "name": "attack.name with its patch_size/location/patch/trigger_seed/params as poisoned (or attack.name: "
                     "none with objective.asr: proxy when the trigger is unknown)",
             "mismatch": "set attack.manifest to the manifest the model was poisoned with, or drop it"},
}


def resolve_attack(card: Mapping[str, Any], manifest: Mapping[str, Any] | None, overrides: Mapping[str, Any],
                   where: str = "checkpoint", *, words: Literal["flags", "file"] = "flags",
                   image_size: int | None = None) -> tuple[AttackSpec, str]:
    """The trigger to measure ASR with: recorded (card or poison manifest) plus explicit overrides, never a guess.

    The one rule of every command that measures a checkpoint's ASR (`evaluate`, a sweep's start and trials).

    Args:
        card: The checkpoint's card ({} without one).
        manifest: A poison manifest (`cleansweep poison` wrote it), or None.
        overrides: AttackSpec fields given explicitly (`name`, `target`, `patch_size`, `location`, `patch`,
            `trigger_seed`, `params`, `seed`); None values are not given.
        where: The checkpoint, for messages.
        words: "flags" (`cleansweep evaluate`: a flag is an explicit override of one setting) or "file" (a sweep's
            `attack:`, written once and reused: messages name its keys).
        image_size: Given, an override that contradicts the recorded trigger (a different name, target or effective
            parameter at this resolution) is refused; a sweep passes it unless its file says `attack.override: true`.

    Returns:
        The AttackSpec and where it came from ("card", "manifest", "card+flags", "file", ...).

    Raises:
        UserError: the card and the manifest name different triggers, an override contradicts them (see
            `image_size`), or nothing records the trigger and no name was given (the per-run parts of a trigger -
            fixed patch, position, seed - cannot be guessed).
    """
    text = _WORDS[words]
    given = {k: v for k, v in overrides.items() if v is not None and v != {}}
    card_attack, manifest_attack = recorded_attack(card), attack_from_manifest(manifest) if manifest else None
    if card_attack and manifest_attack and not _same_trigger(card_attack, manifest_attack):
        raise UserError(f"{where}: its card records trigger {describe_trigger(card_attack)} but the poison manifest "
                        f"says {describe_trigger(manifest_attack)}; {text['mismatch']}")
    recorded, source = (manifest_attack, "manifest") if manifest_attack else (card_attack, "card")
    if recorded is None:
        if "name" not in given:
            raise UserError(f"{where}: no trigger recorded (no card with an attack, no {text['manifest']}); pass "
                            f"{text['manifest']} MANIFEST.json from `cleansweep poison`, or name the trigger: "
                            f"{text['name']}")
        recorded, source = {}, text["given"]
    params = {**(recorded.get("params") or {}), **(given.get("params") or {})}
    values = {**recorded, **{k: v for k, v in given.items() if k != "params"}, "params": params}
    try:
        spec = AttackSpec.model_validate(values)
    except ValueError as e:
        raise UserError(f"{where}: the trigger {values} is not valid ({str(e).splitlines()[-1].strip()})") from None
    if image_size is not None and recorded and given:
        _refuse_contradiction(recorded, spec, image_size, f"{where}: its {source}")
    return spec, source if source == text["given"] or not given else f"{source}+{text['given']}"


def _refuse_contradiction(recorded: Mapping[str, Any], spec: AttackSpec, image_size: int, whose: str) -> None:
    if spec.name == NO_ATTACK:  # the user says the trigger is unknown (proxy ASR only): nothing to contradict
        return
    try:
        diffs = trigger_differences(AttackSpec.model_validate(recorded), spec, image_size)
    except ValueError:
        diffs = ["(the recorded trigger is not a valid attack)"]
    if diffs:
        raise UserError(f"{whose} records trigger {describe_trigger(recorded)} but attack: sets {', '.join(diffs)}; "
                        "drop those keys to measure ASR with the trigger the model was poisoned with, or set "
                        "attack.override: true to measure with the file's")


def trigger_differences(recorded: AttackSpec, other: AttackSpec, image_size: int) -> list[str]:
    """`key=value (recorded: value)` for each part of the trigger where `other` differs from `recorded`: name, target,
    every effective parameter at `image_size` (defaults filled in, so writing a default is no difference). The
    evaluation `seed` is not part of the trigger."""
    diffs = [f"{k}={getattr(other, k)!r} (recorded: {getattr(recorded, k)!r})" for k in ("name", "target")
             if getattr(other, k) != getattr(recorded, k)]
    if other.name != recorded.name:  # parameters of two different triggers do not compare
        return diffs
    a, b = _effective_params(recorded, image_size), _effective_params(other, image_size)
    return diffs + [f"{k}={b.get(k)!r} (recorded: {a.get(k)!r})" for k in sorted(a.keys() | b.keys())
                    if a.get(k) != b.get(k)]


def _effective_params(spec: AttackSpec, image_size: int) -> dict[str, Any]:
    return resolve_trigger_params(spec.name, image_size, **{k: getattr(spec, k) for k in ATTACK_FIELDS}, **spec.params)


def _same_trigger(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    try:
        x, y = AttackSpec.model_validate(a), AttackSpec.model_validate(b)
    except ValueError:
        return False
    # The evaluation seed is not part of the trigger; patch_size None means "the default at this resolution".
    keys = ("name", "target", "location", "patch", "trigger_seed", "params")
    same_size = x.patch_size is None or y.patch_size is None or x.patch_size == y.patch_size
    return same_size and all(getattr(x, k) == getattr(y, k) for k in keys)


def describe_trigger(attack: Mapping[str, Any]) -> str:
    """`name=badnet, target=banana, patch_size=8, ...`: every trigger field that is set (not the evaluation seed)."""
    return ", ".join(f"{k}={v}" for k, v in attack.items() if k != "seed" and v not in (None, {}))


def evaluate_checkpoint(checkpoint: str | Path, eval_dir: str | Path, *, model_name: str | None = None,
                        attack: str | None = None, target: str | None = None, patch_size: int | None = None,
                        location: str | None = None, patch: str | None = None, trigger_seed: int | None = None,
                        params: Mapping[str, Any] | None = None, manifest: str | Path | None = None,
                        subset: int | None = None, batch_size: int = 256, seed: int = 0,
                        device: str = "auto") -> dict[str, Any]:
    """Evaluate a checkpoint file on an evaluation folder (`cleansweep evaluate`).

    The trigger is the one the checkpoint's card records (or the poison manifest's), with any explicitly given
    parameter on top (`resolve_attack`); a checkpoint with no recorded trigger needs `attack` named.

    Args:
        checkpoint: .safetensors or .pt file (never unpickled as code).
        eval_dir: ImageNet-style folder, see `cleansweep.data.EvalFolder`.
        model_name: model config; default: the checkpoint card's, else the single registered model whose shapes fit.
        attack, target, patch_size, location, patch, trigger_seed, params: explicit trigger settings (None: as
            recorded).
        manifest: the poison manifest (`manifest.json` of `cleansweep poison`) of the model's training data.
        subset: evaluate a fixed seeded subset of this many images.
        batch_size: evaluation batch size.
        seed: seeds the subset and the per-image trigger draws.
        device: "auto", "cpu" or "cuda".

    Returns:
        The metrics of `evaluate` plus `model`, `checkpoint`, `sha256`, `attack` (the full trigger), `attack_source`,
        `target`.
    """
    from cleansweep.data import EvalFolder

    card = read_card(checkpoint)
    overrides = {"name": attack, "target": target, "patch_size": patch_size, "location": location, "patch": patch,
                 "trigger_seed": trigger_seed, "params": dict(params or {})}
    spec, source = resolve_attack(card, read_manifest(manifest) if manifest else None, overrides, str(checkpoint))
    dev = resolve_device(device)
    bundle = load_checkpoint_model(checkpoint, model_name)
    name, model = bundle.name, bundle.model.to(dev)
    dataset = EvalFolder(eval_dir, bundle.image_size, subset=subset, seed=seed)
    target_index = dataset.class_index(spec.target)
    trigger = attack_trigger(spec, bundle.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    classifier = zeroshot_classifier(model, bundle.tokenizer, dataset.classnames, dataset.templates, dev)
    metrics = evaluate(model, loader, classifier, normalize=(bundle.mean, bundle.std), target_index=target_index,
                       trigger=trigger, seed=seed, device=dev)
    return {**metrics, "model": name, "checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint),
            "attack": spec.name, "trigger": {**trigger.keywords, "params": spec.params}, "attack_source": source,
            "target": spec.target}


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"poison manifest not found: {path}; pass the manifest.json `cleansweep poison` "
                        "wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable poison manifest ({type(e).__name__}); pass the manifest.json "
                        "`cleansweep poison` wrote") from None
    if not isinstance(manifest, dict) or not {"attack", "target"} <= set(manifest):
        raise UserError(f"{path} is not a poison manifest (no attack/target); pass the manifest.json `cleansweep "
                        "poison` wrote")
    return manifest
