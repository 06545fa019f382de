"""Shrink and perturb (Ash & Adams, 2020): theta <- shrink * theta + perturb * noise, once before finetuning.

Two kinds of noise, chosen by `ShrinkPerturbSpec.perturb_kind`:
- ``init`` (default): the noise is a fresh random initialisation of the same model, as in the paper's code
  (and Ash & Adams' original formulation).
- ``gaussian``: i.i.d. N(0, 1) noise per weight, i.e. p ~ N(0, perturb^2) as the paper's text states.
Every parameter is changed ("we add a small noise to all its weights"); BatchNorm running statistics are not
parameters and stay as they are.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cleansweep.methods.base import ContrastiveWeights
from cleansweep.methods.contrastive import Contrastive
from cleansweep.models import create_model


class ShrinkPerturbSpec(ContrastiveWeights):
    name: Literal["shrink_perturb"] = "shrink_perturb"
    perturbs_start: ClassVar[bool] = True
    shrink: float = Field(1.0, ge=0, description="Shrink-and-perturb lambda: theta <- lambda*theta + sigma*noise.")
    perturb: float = Field(0.0, ge=0, description="Shrink-and-perturb sigma (scale of the noise, see perturb_kind).")
    perturb_kind: Literal["init", "gaussian"] = Field(
        "init", description="Noise of shrink-and-perturb: a fresh random init (the paper's code) or N(0, 1) per weight."
    )

    def changes_start_weights(self) -> bool:
        return self.shrink != 1.0 or self.perturb != 0.0


class ShrinkPerturb(Contrastive):
    """Contrastive finetuning after a one-time shrink-and-perturb of the weights in `prepare`.

    The "init" noise is `models.create_model(model.model_name, seed)`: open_clip's own initialisation of the same
    architecture, seeded from the `prepare` generator.
    """

    spec_class = ShrinkPerturbSpec
    spec: ShrinkPerturbSpec

    def _noise(self, generator: torch.Generator) -> list[torch.Tensor]:
        params = list(self.model.parameters())
        if self.spec.perturb_kind == "gaussian":
            return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
        name = getattr(self.model, "model_name", "")
        if not name:
            raise ValueError("shrink_perturb with perturb_kind 'init' needs a model from cleansweep.models")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        fresh = create_model(name, seed=seed).model
        return [q.detach().to(p) for q, p in zip(fresh.parameters(), params, strict=True)]

    @torch.no_grad()
    def prepare(self, generator: torch.Generator) -> None:
        if self.spec.shrink == 1.0 and self.spec.perturb == 0.0:
            return
        noise = self._noise(generator) if self.spec.perturb > 0 else None
        for i, p in enumerate(self.model.parameters()):
            p.mul_(self.spec.shrink)
            if noise is not None:
                p.add_(noise[i], alpha=self.spec.perturb)
