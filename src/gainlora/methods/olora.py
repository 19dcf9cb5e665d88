"""O-LoRA (Wang et al., 2023): each new branch trains A and B, with A pushed orthogonal to old A's."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from gainlora.methods.base import IncLoRA, MaxBatches
from gainlora.model.module import ContinualLM


NonNegative = Annotated[float, Field(ge=0)]


class OLoRA(IncLoRA):
    """loss += lambda1 * sum_{i<t} sum_modules |A_i A_t^T|_1 + lambda2 * (||A_t|| + ||B_t||)."""

    name = "olora"

    def __init__(self, lambda1: NonNegative = 0.5, lambda2: NonNegative = 0.0, max_batches: MaxBatches = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.lambda1, self.lambda2 = lambda1, lambda2

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        ortho, norms = 0.0, 0.0
        for layer in model.adapted.values():
            if layer.lora_A is None:
                continue
            if self.lambda1 and layer.num_frozen:
                ortho = ortho + (layer.frozen_A @ layer.lora_A.T).abs().sum()
            if self.lambda2:
                norms = norms + layer.lora_A.norm() + layer.lora_B.norm()
        total = self.lambda1 * ortho + self.lambda2 * norms
        return total if isinstance(total, Tensor) else None
