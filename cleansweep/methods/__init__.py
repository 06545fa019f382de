"""Training and cleaning methods as tasks (see `base.Task`), registered by name.

Heavy regularization is not a class: it is `contrastive` with a weight-decay search space. MMCL-only and SSL-only
cleaning are `contrastive` with one weight at 0.
"""

from __future__ import annotations

from torch import nn

from cleansweep.config import MethodSpec
from cleansweep.errors import UserError
from cleansweep.methods.base import Task
from cleansweep.methods.contrastive import Contrastive
from cleansweep.methods.deep_cluster import DeepCluster
from cleansweep.methods.l2_init import L2Init
from cleansweep.methods.perturb_recover import PerturbRecover
from cleansweep.methods.shrink_perturb import ShrinkPerturb

METHODS: dict[str, tuple[type[Task], str]] = {
    "contrastive": (
        Contrastive,
        "mmcl_weight * MMCL + ssl_weight * in-modal SSL: pre-training (MMCL, MMCL+SSL), CleanCLIP, MMCL-/SSL-only, "
        "and heavy regularization (with a weight-decay space)",
    ),
    "deep_cluster": (
        DeepCluster,
        "contrastive + cluster_weight * CE on per-epoch spherical k-means pseudo-labels through a fresh linear head",
    ),
    "l2_init": (L2Init, "contrastive + l2_init_weight * squared L2 distance to the weights at the start of cleaning"),
    "perturb_recover": (
        PerturbRecover,
        "Perturb and Recover: contrastive - par_weight * mean min(1 - cos(f, f0), par_cap) over image and text "
        "embeddings, f0 = the model frozen at the start of cleaning (no trigger knowledge)",
    ),
    "shrink_perturb": (
        ShrinkPerturb,
        "theta <- shrink * theta + perturb * noise (fresh init or N(0, 1)) once before training, then contrastive",
    ),
}


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


def create_task(spec: MethodSpec, model: nn.Module, *, distributed: bool = False) -> Task:
    """Build the task named by `spec.name` around `model`.

    Args:
        spec: Method name and hyperparameters.
        model: The CLIP model to train.
        distributed: Gather features across ranks for the contrastive losses.

    Raises:
        UserError: Unknown method name.
    """
    if spec.name not in METHODS:
        raise UserError(f"unknown method {spec.name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[spec.name][0](model, spec, distributed=distributed)


__all__ = ["METHODS", "Task", "create_task", "list_methods"]
