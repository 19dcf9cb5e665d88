"""MIGU's gradient mask (Du et al., 2024): after backward, keep the gradient only of output units
whose L1 output magnitude over the step's tokens is above a quantile of the layer's units.

For a LoRA branch y = W h + s B (A h) there are two sets of output units:
- A's rows (r units): magnitude sum_tokens |A h|;
- B's rows (d_out units): magnitude sum_tokens |y| of the whole adapted layer (the reference code's
  ``activation_combined=True``) or of the branch output s B A h (``combined=False``).
A row of A (B) whose unit is below ``torch.quantile(magnitudes, quantile)`` gets zero gradient, as
in the reference (``importance = magnitude > quantile``). Magnitudes are summed over every
micro-batch of an optimizer step (gradient accumulation), over all ranks under DDP, and reset after
the step.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from gainlora.memory import distributed
from gainlora.model.lora import GatedLoRALinear


def magnitude_mask(magnitudes: Tensor, quantile: float) -> Tensor:
    """1.0 for units strictly above the ``quantile`` of ``magnitudes`` (1-d), else 0.0."""
    return (magnitudes > torch.quantile(magnitudes.float(), quantile)).to(magnitudes.dtype)


class MagnitudeMask(L.Callback):
    def __init__(self, quantile: float, *, combined: bool = True) -> None:
        self.quantile, self.combined = quantile, combined
        self.sums: dict[str, list[Tensor]] = {}  # layer name -> [A units, B units]
        self._handles: list = []

    def _record(self, name: str, layer: GatedLoRALinear, inputs: tuple, output: Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled()) or layer.lora_A is None:
            return  # validation, generation, feature collection
        with torch.no_grad():
            h = inputs[0].reshape(-1, layer.in_features).float()
            z = h @ layer.lora_A.T
            y = output.reshape(-1, layer.out_features).float() if self.combined \
                else layer.scale * z @ layer.lora_B.T
            a, b = z.abs().sum(0), y.abs().sum(0)
        if name in self.sums:
            self.sums[name][0] += a
            self.sums[name][1] += b
        else:
            self.sums[name] = [a, b]

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer is not None and "DeepSpeed" in type(trainer.strategy).__name__:
            raise RuntimeError("MIGU's gradient mask needs whole gradients; DeepSpeed partitions them: "
                               "use strategy=ddp or auto")
        for name, layer in pl_module.adapted.items():
            hook = lambda mod, inp, out, name=name: self._record(name, mod, inp, out)  # noqa: E731
            self._handles.append(layer.register_forward_hook(hook))

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, layer in pl_module.adapted.items():
            if name not in self.sums:
                continue
            for sums, param in zip(self.sums[name], (layer.lora_A, layer.lora_B)):
                if distributed():
                    torch.distributed.all_reduce(sums)
                if param.grad is not None:
                    param.grad.mul_(magnitude_mask(sums, self.quantile).to(param.grad.dtype)[:, None])
        self.sums = {}

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.sums = [], {}
