"""`cleansweep scan`: is this CLIP model backdoored? DECREE trigger inversion (`cleansweep.detect.inversion`) run on
a checkpoint and clean evaluation images, the verdict, and its files: scan.json, inversion.safetensors with its card
(`cleansweep.detect.proxy`) and the inverted-trigger figure (`cleansweep.results.figures.plot_inversions`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cleansweep import __version__
from cleansweep.data import EvalFolder
from cleansweep.detect.inversion import (
    PL1_THRESHOLD,
    RATIO_THRESHOLD,
    Inversion,
    invert_trigger,
    inverted_trigger,
    predict_classes,
    proxy_asr,
    suspected_target,
    verdict,
)
from cleansweep.detect.proxy import save_inversion
from cleansweep.evaluate import resolve_device, zeroshot_classifier
from cleansweep.models import ModelBundle, file_sha256, load_checkpoint_model
from cleansweep.results.figures import plot_inversions
from cleansweep.runtime import storage
from cleansweep.runtime.atomic import write_atomic, write_json


def load_model(checkpoint: str | Path, model_name: str | None = None,
               device: str | torch.device = "cpu") -> ModelBundle:
    """A checkpoint's model, in eval mode on `device`, with its transforms (model name: argument, card, or shapes)."""
    bundle = load_checkpoint_model(checkpoint, model_name)
    bundle.model.to(device).eval()
    return bundle


def _load_images(dataset: EvalFolder, batch_size: int) -> tuple[Tensor, Tensor]:
    raws, labels = zip(*DataLoader(dataset, batch_size=batch_size, shuffle=False), strict=True)
    return torch.cat(raws), torch.cat(labels)


def _batches(images: Tensor, labels: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def scan_model(bundle: ModelBundle, dataset: EvalFolder, settings: dict[str, Any],
               device: torch.device) -> tuple[dict[str, Any], Inversion]:
    """Invert the trigger of one loaded model on an evaluation set and measure what it does.

    Args:
        bundle: the model and its transforms (`load_model`).
        dataset: evaluation folder at the model's resolution.
        settings: `invert_trigger` keyword arguments (steps, lr, batch_size, threshold, init_weight, seed).
        device: where to compute.

    Returns:
        (report, inversion). The report holds the inversion's numbers, the suspected target (name and index), its
        share among triggered non-target images (`proxy_asr`, measured with `evaluate`), the same share without the
        trigger (`clean_target_share`), the clean zero-shot top-1 and the number of images.
    """
    model, normalize, seed = bundle.model, (bundle.mean, bundle.std), settings.get("seed", 0)
    images, labels = _load_images(dataset, settings.get("batch_size", 32))
    inversion = invert_trigger(model, images, normalize, device=device, **settings)
    classifier = zeroshot_classifier(model, bundle.tokenizer, dataset.classnames, dataset.templates, device)
    trigger = inverted_trigger(inversion.mask, inversion.pattern)
    target, share = suspected_target(model, classifier, images, labels, trigger, normalize, seed=seed)
    asr = proxy_asr(model, _batches(images, labels, 64), classifier, trigger, normalize=normalize,
                    target_index=target, seed=seed, device=device)
    clean = predict_classes(model, classifier, images, normalize)
    others = labels != target
    report = {"model": bundle.name, "image_size": bundle.image_size, "num_images": len(labels),
              **inversion.summary(), "suspected_target": dataset.classnames[target], "target_index": target,
              "target_share": share, "proxy_asr": asr,
              "clean_target_share": float((clean[others] == target).float().mean()) if others.any() else 0.0,
              "zeroshot_top1": float((clean == labels).float().mean())}
    return report, inversion


def _scan_file(checkpoint: str | Path, eval_dir: str | Path, model_name: str | None, subset: int | None,
               settings: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], Inversion]:
    bundle = load_model(checkpoint, model_name, device)
    dataset = EvalFolder(eval_dir, bundle.image_size, subset=subset, seed=settings.get("seed", 0))
    report, inversion = scan_model(bundle, dataset, settings, device)
    return {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint), **report}, inversion


def scan_checkpoint(checkpoint: str | Path, eval_dir: str | Path, *, out_dir: str | Path,
                    reference: str | Path | None = None, model_name: str | None = None,
                    reference_model: str | None = None, subset: int | None = 500, steps: int = 300,
                    lr: float = 0.5, batch_size: int = 32, threshold: float = 0.99, init_weight: float = 1e-3,
                    seed: int = 0, device: str = "auto", pl1_threshold: float = PL1_THRESHOLD,
                    ratio_threshold: float = RATIO_THRESHOLD) -> dict[str, Any]:
    """`cleansweep scan`: is this checkpoint backdoored? DECREE trigger inversion on clean evaluation images.

    Writes `out_dir/scan.json` (every number, paths, settings, seeds, sha256), `out_dir/inverted_trigger.png`
    (mask, pattern, mask x pattern; a second row for the reference) and `out_dir/inversion.safetensors` + its
    `inversion.json` card (for `load_inversion` / `load_proxy`).

    Args:
        checkpoint: .safetensors or .pt model file (never unpickled as code).
        eval_dir: ImageNet-style folder (`cleansweep.data.EvalFolder`); its images are the clean inputs.
        out_dir: where the three outputs go (created): a folder, or an s3:// / gs:// URI they are uploaded to.
        reference: a clean model checkpoint to compare with (same inversion, ratio of the PL1-norms).
        model_name, reference_model: model configs (default: the card's, else the one whose shapes fit).
        subset: use a seeded subset of this many images (None: all).
        steps, lr, batch_size, threshold, init_weight, seed: `invert_trigger` settings (seed also draws the subset).
        device: "auto", "cpu" or "cuda".
        pl1_threshold, ratio_threshold: the verdict's thresholds (see `verdict`).

    Returns:
        The scan.json content: `model` (report of `scan_model` + checkpoint, sha256), `reference` (same or None),
        `verdict` (`backdoored`, `ratio`, `rule`), `settings`, `files`, `version`.
    """
    dev = resolve_device(device)
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "threshold": threshold,
                "init_weight": init_weight, "seed": seed}
    report, inversion = _scan_file(checkpoint, eval_dir, model_name, subset, settings, dev)
    ref_report, ref_inversion = (_scan_file(reference, eval_dir, reference_model, subset, settings, dev)
                                 if reference is not None else (None, None))
    decision = verdict(report["pl1_norm"], ref_report["pl1_norm"] if ref_report else None,
                       pl1_threshold=pl1_threshold, ratio_threshold=ratio_threshold)
    remote = storage.is_remote(out_dir)
    out = storage.local_staging("scan") if remote else Path(out_dir)  # object storage: written here, then uploaded
    names = ("scan.json", "inverted_trigger.png", "inversion.safetensors")
    files = {name: str(storage.join(out_dir if remote else out, name)) for name in names}
    local = {name: str(out / name) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = _write_scan(local, files, report, ref_report, inversion, ref_inversion, decision, eval_dir,
                             settings | {"subset": subset, "device": str(dev), "pl1_threshold": pl1_threshold,
                                         "ratio_threshold": ratio_threshold})
        if remote:
            for name in storage.list_files(out):
                storage.upload(out / name, storage.join(out_dir, name))
    finally:
        if remote:
            shutil.rmtree(out, ignore_errors=True)
    return result


def _write_scan(local: dict[str, str], files: dict[str, str], report: dict[str, Any],
                ref_report: dict[str, Any] | None, inversion: Inversion, ref_inversion: Inversion | None,
                decision: dict[str, Any], eval_dir: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write a scan's files at their `local` paths; scan.json names them by their final `files` locations."""
    save_inversion(local["inversion.safetensors"], inversion.mask, inversion.pattern,
                   {k: report[k] for k in ("checkpoint", "sha256", "model", "image_size", "suspected_target",
                                           "target_index", "pl1_norm", "proxy_asr")} | {"eval_dir": str(eval_dir)})
    shown = [("model", inversion)] + ([("reference", ref_inversion)] if ref_inversion is not None else [])
    figure = plot_inversions([(label, inv.mask.numpy(), inv.pattern.numpy()) for label, inv in shown])
    write_atomic(local["inverted_trigger.png"], lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    result = {"model": report, "reference": ref_report, "verdict": decision, "eval_dir": str(eval_dir),
              "settings": settings, "files": files, "version": __version__}
    write_json(local["scan.json"], result)
    return result
