"""Per-element importance of the branch being trained, as TaSL (and AdaLoRA before it) estimates it:
after every backward, sensitivity I = |theta * grad|, smoothed I_bar <- b1 I_bar + (1 - b1) I, and
its uncertainty U_bar <- b2 U_bar + (1 - b2) |I - I_bar|; a matrix's importance is mean(I_bar U_bar)."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor


class ImportanceTracker(L.Callback):
    def __init__(self, beta1: float, beta2: float, params: Callable[[L.LightningModule], dict[str, Tensor]]) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.params = params  # the tracked tensors of a module, by name
        self.avg_ipt: dict[str, Tensor] = {}
        self.avg_unc: dict[str, Tensor] = {}

    @staticmethod
    def sensitivity(param: Tensor, grad: Tensor) -> Tensor:
        """First-order estimate of the loss change from removing each element: |theta * grad|."""
        return (param * grad).abs()

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        for key, param in params.items():
            if param.grad is None:
                continue
            ipt = self.sensitivity(param, param.grad).float()
            if key not in self.avg_ipt:
                self.avg_ipt[key], self.avg_unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
            self.avg_ipt[key].mul_(self.beta1).add_((1 - self.beta1) * ipt)
            self.avg_unc[key].mul_(self.beta2).add_((1 - self.beta2) * (ipt - self.avg_ipt[key]).abs())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.update(self.params(pl_module))

    # In-task checkpoints keep the averages, so a task resumed mid-way ranks its units as if uninterrupted.
    def state_dict(self) -> dict:
        return {"avg_ipt": dict(self.avg_ipt), "avg_unc": dict(self.avg_unc)}

    def load_state_dict(self, state: dict) -> None:
        self.avg_ipt, self.avg_unc = dict(state["avg_ipt"]), dict(state["avg_unc"])

    def scores(self, params: dict[str, Tensor]) -> dict[str, float]:
        """mean(I_bar * U_bar) per matrix; 0 for one that never had a gradient."""
        return {k: (self.avg_ipt[k] * self.avg_unc[k]).mean().item() if k in self.avg_ipt else 0.0 for k in params}
