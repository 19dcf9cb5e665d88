"""Model selection within a task: keep the trainable weights of the best validation score.

The reference code evaluates every few epochs and keeps each task's best checkpoint. Only the
current branch and gate train, so their values (kilobytes to megabytes) are kept in memory instead
of writing full checkpoints, and restored when fit ends.
"""
from __future__ import annotations

import lightning as L
import torch


class BestTrainableState(L.Callback):
    def __init__(self, monitor: str = "val/score") -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.state: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if score is None or trainer.sanity_checking:
            return
        score = float(score)
        if self.best is None or score > self.best:
            self.best = score
            self.state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        params = dict(pl_module.named_parameters())
        for name, value in self.state.items():
            params[name].copy_(value)
