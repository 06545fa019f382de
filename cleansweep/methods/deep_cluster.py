"""Deep clustering (Caron et al., 2018) added to the contrastive cleaning objective (paper section 5).

At the start of every epoch: embed the cleaning set with the current image encoder (eval mode, no augmentation),
run spherical k-means (faiss, k = num_clusters, cluster_iters iterations) on the normalised embeddings, and
re-initialise a linear head N(0, 0.01) from image features to the k clusters. Each step adds
``cluster_weight * CE(head(image_features), pseudo_label)``. Under DDP rank 0 clusters and broadcasts the labels
and the head, so every rank trains on the same targets.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import faiss
import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from cleansweep.limits import MAX_COUNT, MAX_STEPS
from cleansweep.losses import cluster_loss
from cleansweep.methods.base import ContrastiveWeights
from cleansweep.methods.contrastive import Contrastive


class DeepClusterSpec(ContrastiveWeights):
    name: Literal["deep_cluster"] = "deep_cluster"
    cluster_weight: float = Field(0.0, ge=0, description="Weight of the deep-clustering cross-entropy.")
    num_clusters: int = Field(1000, ge=2, le=MAX_COUNT, description="k of the spherical k-means for deep clustering.")
    cluster_iters: int = Field(20, ge=1, le=MAX_STEPS, description="k-means iterations per epoch.")

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "cluster_weight": self.cluster_weight}

    def for_rows(self, rows: int) -> DeepClusterSpec:
        """k capped at the number of rows: k-means cannot make more clusters than points."""
        if self.num_clusters <= rows:
            return self
        warnings.warn(f"deep_cluster: num_clusters {self.num_clusters} > {rows} rows; using k = {rows}", stacklevel=3)
        return self.model_copy(update={"num_clusters": rows})


@torch.no_grad()
def embed_images(model: nn.Module, loader: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalised image embeddings of every batch of `loader` (eval mode) and their dataset row indices."""
    was_training = model.training
    model.eval()
    feats, indices = [], []
    try:
        for batch in loader:
            feats.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
            indices.append(batch["index"].cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("deep_cluster: the cleaning set produced no images to cluster")
    return torch.cat(feats), torch.cat(indices)


def spherical_kmeans(x: Tensor, k: int, iters: int, seed: int) -> Tensor:
    """Cluster assignment of each row of `x` (L2-normalised) by faiss' spherical k-means.

    Returns:
        Long tensor (N,) of cluster ids in [0, k).
    """
    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(data.shape[1], k, niter=iters, spherical=True, seed=seed, verbose=False)
    kmeans.train(data)
    _, assignment = kmeans.index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64))


class DeepCluster(Contrastive):
    """Contrastive objective + cross-entropy on per-epoch k-means pseudo-labels through a fresh linear head."""

    spec_class = DeepClusterSpec
    spec: DeepClusterSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        embed_dim = self.model.visual.output_dim
        self.head = nn.Linear(embed_dim, self.spec.num_clusters)
        self._reset_head()
        # Row index -> pseudo-label (-1 = not clustered, e.g. a skipped bad image); saved via get/set_extra_state.
        self.pseudo_labels: Tensor | None = None

    def _reset_head(self) -> None:
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def fresh_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def on_epoch_start(self, epoch: int, embed_loader: Any, device: torch.device) -> None:
        size = len(embed_loader.dataset)
        labels = torch.full((size,), -1, dtype=torch.long)
        distributed = self.distributed and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:
            feats, indices = embed_images(self.model, embed_loader, device)
            k = min(self.spec.num_clusters, feats.shape[0])
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
            labels[indices] = spherical_kmeans(feats, k, self.spec.cluster_iters, seed)
            with torch.no_grad():
                self._reset_head()
        labels = labels.to(device)
        if distributed:
            dist.broadcast(labels, src=0)
            for p in self.head.parameters():
                dist.broadcast(p.data, src=0)
        self.pseudo_labels = labels

    def get_extra_state(self) -> dict[str, Tensor]:
        return {} if self.pseudo_labels is None else {"pseudo_labels": self.pseudo_labels.cpu()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        labels = state.get("pseudo_labels")
        self.pseudo_labels = None if labels is None else labels.to(self.head.weight.device)

    def losses(self, batch: dict[str, Tensor], feats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        parts, weights = super().losses(batch, feats)
        if self.pseudo_labels is None:
            raise RuntimeError("deep_cluster: on_epoch_start() has not computed pseudo-labels yet")
        targets = self.pseudo_labels[batch["index"].to(self.pseudo_labels.device)]
        logits = self.head(feats["image"].to(self.head.weight.dtype))
        parts["cluster_loss"] = cluster_loss(logits, targets)
        weights["cluster_loss"] = self.spec.cluster_weight
        return parts, weights
