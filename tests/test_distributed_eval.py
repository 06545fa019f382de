"""Evaluation split across ranks: two gloo processes on CPU each evaluate every other batch and sum the counts; the
metrics equal single-process evaluation exactly (the triggered set included: the trigger's generator is seeded per
batch, not per process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from cleansweep.attacks.registry import attack_trigger
from cleansweep.config import AttackSpec
from cleansweep.data import EvalFolder
from cleansweep.evaluate import evaluate, zeroshot_classifier
from cleansweep.models import create_model

ATTACK = AttackSpec(name="badnet", target="banana", patch_size=4)


def _metrics(eval_dir: str, rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    bundle = create_model("tiny-rn", seed=3)
    folder = EvalFolder(eval_dir, bundle.image_size)
    loader = DataLoader(folder, batch_size=5, shuffle=False)  # 36 images: 8 batches, the last one short
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, folder.classnames, folder.templates, "cpu")
    return evaluate(bundle.model, loader, classifier, normalize=(bundle.mean, bundle.std),
                    target_index=folder.class_index(ATTACK.target), trigger=attack_trigger(ATTACK, bundle.image_size),
                    seed=11, rank=rank, world=world)


def _worker(rank: int, world: int, eval_dir: str, out: str, rendezvous: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps(_metrics(eval_dir, rank, world)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_evaluate_exactly_as_one_process(tiny_world: dict, tmp_path: Path) -> None:
    single = _metrics(tiny_world["eval_dir"], 0, 1)
    assert single["num_images"] == 36 and single["num_asr_images"] > 0
    mp.spawn(_worker, args=(2, tiny_world["eval_dir"], str(tmp_path), str(tmp_path / "rendezvous")), nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


def test_the_triggered_set_does_not_depend_on_which_batches_a_process_saw(tiny_world: dict) -> None:
    # Without a process group, rank 1 of 2 evaluates batches 1, 3, 5, 7 only: its triggered images are the very ones
    # those batches get in the full pass (same per-batch generator), so ranks 0 and 1 add up to the whole.
    from cleansweep.evaluate import _counts, normalizer
    from cleansweep.objective import ASR

    bundle = create_model("tiny-rn", seed=3)
    folder = EvalFolder(tiny_world["eval_dir"], bundle.image_size)
    loader = DataLoader(folder, batch_size=5, shuffle=False)
    classifier = zeroshot_classifier(bundle.model, bundle.tokenizer, folder.classnames, folder.templates, "cpu")
    attacks = {ASR: (attack_trigger(ATTACK, bundle.image_size), folder.class_index(ATTACK.target))}
    args = (bundle.model, loader, classifier, attacks, normalizer((bundle.mean, bundle.std)), 11,
            torch.device("cpu"), None, False)
    whole = _counts(*args, 0, 1)
    assert torch.equal(_counts(*args, 0, 2) + _counts(*args, 1, 2), whole)
    assert whole[0] == 36
