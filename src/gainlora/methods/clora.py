"""C-LoRA (Smith et al., 2023, "Continual Diffusion", eqs. 4-5): per-task LoRA updates summed into
the weights (the IncLoRA structure), the new one penalised where the past ones already changed the
weights:

    W_t = W + sum_{i<=t} dW_i,   loss += lambda * || (sum_{i<t} dW_i) (.) dW_t ||_F^2

with (.) the element-wise product and dW_i = s B_i A_i the update branch i adds to each adapted
matrix (s = alpha / r). The sum over frozen branches is one product of the stacked buffers.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from gainlora.methods.base import IncLoRA
from gainlora.model.lora import GatedLoRALinear
from gainlora.model.module import ContinualLM


def past_update(layer: GatedLoRALinear) -> Tensor:
    """sum_{i<t} s B_i A_i of one layer (d_out x d_in), without autograd: old branches are frozen."""
    with torch.no_grad():
        return layer.scale * (layer.frozen_B @ layer.frozen_A)


def clora_penalty(layer: GatedLoRALinear) -> Tensor:
    """|| past (.) s B_t A_t ||_F^2 for one layer with a current and at least one frozen branch."""
    current = layer.scale * (layer.lora_B @ layer.lora_A)
    return (past_update(layer) * current).pow(2).sum()


class CLoRA(IncLoRA):
    name = "clora"

    def __init__(self, lambda_clora: Annotated[float, Field(ge=0)] = 100.0,
                 max_batches: Annotated[int | None, Field(ge=1)] = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.lambda_clora = lambda_clora

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        total = None
        for layer in model.adapted.values():
            if layer.lora_A is None or not layer.num_frozen:
                continue
            term = clora_penalty(layer)
            total = term if total is None else total + term
        return None if total is None or not self.lambda_clora else self.lambda_clora * total
