"""A worked example of adding a method (docs/extending.md): IncLoRA plus an L2 pull of the new
branch's weight change toward zero.

    loss += lam * sum_layers ||s B_t A_t||_F^2

the squared Frobenius norm of what the current branch adds to each adapted weight, computed as
s^2 <B_t^T B_t, A_t A_t^T> (two r x r products) instead of forming the d_out x d_in product.
Everything else (a new branch per task, old ones frozen, no gates) is IncLoRA's.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from gainlora.methods.base import IncLoRA, MaxBatches
from gainlora.model.module import ContinualLM


class L2IncLoRA(IncLoRA):
    name = "example_l2"

    def __init__(self, lam: Annotated[float, Field(ge=0)] = 0.01, max_batches: MaxBatches = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.lam = lam

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        total = None
        for layer in model.adapted.values():
            if layer.lora_A is None:  # no open branch (nothing trains in this layer)
                continue
            A, B = layer.lora_A, layer.lora_B
            term = layer.scale**2 * ((B.T @ B) * (A @ A.T)).sum()
            total = term if total is None else total + term
        return None if total is None or not self.lam else self.lam * total
