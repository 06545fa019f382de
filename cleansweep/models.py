"""CLIP models by name (open_clip configs, random init, no downloads) and safe checkpoint I/O.

Every model is open_clip's `CLIP` built from a JSON config: open_clip's own (`RN50`, `ViT-B-32`, ...) or ours in
`model_configs/` (tiny ones for CPU tests and the demo), registered with `open_clip.add_model_config`: a new model
is its JSON file there, named by its stem.
`LogScaleCLIP.forward` returns the *log* inverse temperature under `logit_scale` (open_clip returns exp() of it);
the losses take exp() themselves.

Checkpoints are `.safetensors` files with a JSON card next to them (meta, model name, sha256). Loading never executes
code: safetensors, or `.pt`/`.pth` through `torch.load(weights_only=True)`; TorchScript archives are rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.model import CLIP, set_model_preprocess_cfg
from safetensors import SafetensorError
from torch import Tensor, nn

from cleansweep.errors import UserError
from cleansweep.runtime.atomic import write_atomic

CONFIG_DIR = Path(__file__).parent / "model_configs"

# open_clip's own configs that cleansweep offers (ours: every JSON in CONFIG_DIR, see MODELS).
OPEN_CLIP_MODELS: dict[str, str] = {
    "RN50": "open_clip RN50 (ModifiedResNet-50, 224 px, GELU text transformer); the paper's architecture",
    "RN50-quickgelu": "open_clip RN50 with QuickGELU: the activation of OpenAI/CleanCLIP RN50 checkpoints",
    "ViT-B-32": "open_clip ViT-B/32 (224 px)",
}


def _describe(path: Path) -> str:
    """One line about a config of ours, read from its JSON (towers, resolution, embedding width)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    layers = vision.get("layers")
    tower = (f"ModifiedResNet {layers}" if isinstance(layers, list)
             else f"ViT {layers} layers, patch {vision.get('patch_size')}")
    return (f"{tower}, width {vision.get('width')}, {vision.get('image_size')} px, {text.get('layers')}-layer text "
            f"width {text.get('width')}, embed {cfg.get('embed_dim')} ({CONFIG_DIR.name}/{path.name})")


# Name -> description: ours first (one per JSON file, by its stem), then open_clip's.
MODELS: dict[str, str] = {**{p.stem: _describe(p) for p in sorted(CONFIG_DIR.glob("*.json"))}, **OPEN_CLIP_MODELS}

# Registered once per process; open_clip rescans its config folders on every add_model_config call.
if not set(MODELS) <= set(open_clip.list_models()):
    open_clip.add_model_config(CONFIG_DIR)


class LogScaleCLIP(CLIP):
    """open_clip's CLIP whose forward returns the log scale, so losses own the exp() (interfaces.md)."""

    model_name: str = ""

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> dict[str, Tensor | None]:
        """Encode a batch.

        Args:
            image: (B, 3, S, S) normalised images, or None.
            text: (B, L) token ids, or None.

        Returns:
            dict with L2-normalised `image_features`, `text_features` (None for a missing input) and
            `logit_scale`, the log inverse temperature parameter (scale = exp(logit_scale)).
        """
        return {
            "image_features": self.encode_image(image, normalize=True) if image is not None else None,
            "text_features": self.encode_text(text, normalize=True) if text is not None else None,
            "logit_scale": self.logit_scale,
        }


@dataclass
class ModelBundle:
    """A model with everything needed to feed it."""

    model: LogScaleCLIP
    preprocess_train: Callable[[Any], Tensor]
    preprocess_val: Callable[[Any], Tensor]
    tokenizer: Callable[[str | list[str]], Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(MODELS)


def _model_config(name: str) -> dict[str, Any]:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return open_clip.get_model_config(name)


def _build(name: str) -> LogScaleCLIP:
    model = LogScaleCLIP(**_model_config(name))
    model.model_name = name
    return model


def create_model(name: str, *, seed: int | None = None) -> ModelBundle:
    """Build a randomly initialised CLIP model and its transforms.

    Args:
        name: one of `list_models()`.
        seed: seeds the initialisation without touching the global RNG; None uses the global RNG.

    Returns:
        ModelBundle. Training and evaluation use the same deterministic preprocess (resize bicubic, center crop,
        CLIP mean/std), as the reference does: no random crops.
    """
    if seed is None:
        model = _build(name)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(name)
    image_size = model_image_size(name)
    mean, std = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
    set_model_preprocess_cfg(model, {"size": image_size, "mean": mean, "std": std, "mode": "RGB",
                                     "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    return ModelBundle(model=model, preprocess_train=preprocess, preprocess_val=preprocess,
                       tokenizer=_tokenizer(name), image_size=image_size, mean=mean, std=std, name=name)


def model_image_size(name: str) -> int:
    """Input resolution of model `name` (read from its config; no model is built)."""
    return int(_model_config(name)["vision_cfg"]["image_size"])


@cache
def _tokenizer(name: str) -> Callable[[str | list[str]], Tensor]:
    # Stateless once built; building reads and parses the BPE vocabulary (~0.2 s), so share one per name.
    return open_clip.get_tokenizer(name)


# ------------------------------------------------------------------------------------------------ checkpoints
def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (remembered per path, size and mtime within a process)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Every cleaning trial of a sweep hashes the same starting checkpoint (its params record it); once per worker.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(path: str | Path) -> Path:
    """The JSON card that describes the weights file `path`."""
    return Path(path).with_suffix(".json")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (they prefix every key with 'module.')."""
    return getattr(model, "module", model)


def save_checkpoint(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write the model's weights to `path` (.safetensors) and a JSON card next to it.

    Both files are written under temporary names and renamed, so a crash never leaves a complete-looking file.

    Args:
        path: destination, must end in `.safetensors`.
        model: the model (DDP wrappers are unwrapped, so keys never carry 'module.').
        meta: JSON-serialisable facts to keep with the weights (step, metrics, config...).

    Returns:
        `path`. The card `path.with_suffix('.json')` holds `meta`, `model` (the config name) and `sha256`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"checkpoint path {path} must end in .safetensors; rename it")
    module = _unwrap(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"}))
    card = {**dict(meta), "model": meta.get("model") or getattr(module, "model_name", None) or None,
            "weights": path.name, "sha256": file_sha256(path)}
    write_atomic(card_path(path), lambda tmp: tmp.write_text(json.dumps(card, indent=2, default=str) + "\n"))
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The JSON card of a checkpoint (pass the weights file or the card); {} when there is none."""
    cpath = card_path(path)
    if not cpath.is_file():
        return {}
    try:
        card = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cpath}: unreadable checkpoint card ({e}); delete it or pass --model explicitly") from None
    if not isinstance(card, dict):
        raise UserError(f"{cpath}: checkpoint card is not a JSON object; delete it or pass --model explicitly")
    return card


def _is_torchscript(path: Path) -> bool:
    # torch.serialization._is_torchscript_zip looks for the same record.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def _read_torch(path: Path) -> Any:
    if _is_torchscript(path):
        raise UserError(f"{path} is a TorchScript archive, which cannot be loaded without running its code; "
                        "export its state_dict to .safetensors in a trusted environment and pass that")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: torch.load(weights_only=True) refused it ({_unpickler_reason(e)}); pass a "
                        ".safetensors file or a .pt state_dict of tensors (pickled code is never run)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first}); pass a .safetensors or .pt "
                        "state_dict") from None


_ADVICE = re.compile(r"weights_only|weights only load failed|trusted source|check the documentation|file an issue|"
                     r"re-running|safe_globals|in pytorch \d", re.IGNORECASE)


def _unpickler_reason(err: Exception) -> str:
    # torch wraps the unpickler's reason in advice to load with weights_only=False (which runs the file's code):
    # keep only the sentences that say what was refused, never the advice.
    text = " ".join(str(err).split())
    text = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s and not _ADVICE.search(s)]
    return " ".join(sentences).strip() or "it holds objects other than tensors"


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    # Reference layout (CleanCLIP and the paper's code): {"epoch", "name", "state_dict", "optimizer"}.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path}: no model weights found (got {keys or 'nothing'}); pass a checkpoint saved by "
                        "cleansweep, a state_dict, or a dict with a 'state_dict' entry")
    keys = list(obj)
    # DDP / DataParallel checkpoints prefix every key with 'module.'.
    if all(str(k).startswith("module.") for k in keys):
        return {str(k)[len("module."):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read model weights without executing code.

    Args:
        path: `.safetensors`, or `.pt` / `.pth` / `.bin` read with `torch.load(weights_only=True)`; a dict with a
            `state_dict` entry and keys prefixed `module.` (the reference implementations' layout) is accepted.

    Returns:
        state_dict on CPU.

    Raises:
        UserError: missing, unreadable, corrupt, TorchScript, or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; pass the path of a .safetensors or .pt file")
    if path.suffix == ".safetensors":
        try:
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e}); re-save or re-download it") from None
    else:
        obj = _read_torch(path)
    state_dict = _extract_state_dict(obj, path)
    _check_finite(state_dict, path)
    return state_dict


def _check_finite(state_dict: Mapping[str, Tensor], path: Path) -> None:
    # NaN weights evaluate to a plausible-looking number (constant predictions: top-1 = 1/classes, ASR 0) that
    # reads as "cleaned"; no command may start from, evaluate or resume such a checkpoint.
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"{path}: non-finite weights (NaN or inf) in {bad[0]}{more}; a diverged or corrupt model "
                        "cannot be evaluated or cleaned: pass a checkpoint from before the divergence")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@cache
def _config_shapes(name: str) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: shapes only, no memory and no initialisation cost.
    with torch.device("meta"):
        return _shapes(_build(name))


def matching_models(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Names of the registered models whose keys and shapes fit `state_dict` exactly.

    QuickGELU variants share their keys with the GELU ones, so both names are returned for such checkpoints.
    """
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [name for name in MODELS if _config_shapes(name) == wanted]


def _few(keys: list[str], n: int = 3) -> str:
    # BatchNorm counters say little about which architecture a checkpoint is; name real weights first.
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load `state_dict` strictly into `model` (unwrapping DDP).

    Raises:
        UserError: keys missing, unexpected or of another shape; names a few and the models that would fit.
    """
    module = _unwrap(model)
    expected = _shapes(module)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    resized = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}" for k in state_dict
               if k in expected and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or resized:
        name = getattr(module, "model_name", "") or type(module).__name__
        problems = [f"{label} {len(keys)}: {_few(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", resized)) if keys]
        fits = matching_models(state_dict)
        fix = (f"pass --model {' or '.join(fits)}" if fits
               else f"pass the --model it was trained with (choose from: {', '.join(MODELS)})")
        raise UserError(f"checkpoint does not fit model {name!r} ({'; '.join(problems)}); {fix}")
    module.load_state_dict(state_dict, strict=True)
    return model


def load_checkpoint_model(checkpoint: str | Path, model_name: str | None = None, *,
                          model_flag: str = "--model") -> ModelBundle:
    """A model bundle with a checkpoint's weights (safe loaders only). The model config: `model_name`, else the
    checkpoint's card, else the one registered model whose shapes fit (`model_flag` names the option to pass)."""
    state_dict = load_state_dict_file(checkpoint)
    bundle = create_model(checkpoint_model_name(checkpoint, model_name, state_dict, model_flag=model_flag), seed=0)
    load_weights(bundle.model, state_dict)
    return bundle


def checkpoint_model_name(checkpoint: str | Path, model_name: str | None = None,
                          state_dict: Mapping[str, Tensor] | None = None, *, model_flag: str = "--model") -> str:
    """The model config of a checkpoint: its card's; a given `model_name` must agree with the card (RN50 and
    RN50-quickgelu share every key, so a wrong name would load silently with the wrong activation); without a card,
    `model_name`, else the one registered model whose shapes fit `state_dict` (read from the file when None).

    Raises:
        UserError: the name contradicts the card, or no card and no name and the shapes fit none or several models.
    """
    if model_name:
        _model_config(model_name)  # a misspelt name is named as such, not as a contradiction
    card_name = read_card(checkpoint).get("model")
    if model_name and card_name and model_name != card_name:
        raise UserError(f"{checkpoint}: {model_flag} {model_name!r} contradicts its card, which says the model is "
                        f"{card_name!r}; drop {model_flag} (the card's is used) or pass {card_name}")
    name = model_name or card_name
    if name:
        return str(name)
    fits = matching_models(state_dict if state_dict is not None else load_state_dict_file(checkpoint))
    if len(fits) != 1:
        which = f"its weights fit {' and '.join(fits)}" if fits else "its weights fit no registered model"
        raise UserError(f"{checkpoint}: no model card next to it and {which}; pass {model_flag} "
                        f"(one of: {', '.join(fits or list_models())})")
    return fits[0]
