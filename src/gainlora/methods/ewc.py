"""EWC (Kirkpatrick et al., 2017, eq. 3) on the LoRA parameters, as LLM continual-learning code
bases apply it: one branch trained through every task (SeqLoRA), pulled toward its values at the end
of the previous tasks with a diagonal-Fisher-weighted quadratic penalty

    loss += lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* = the branch after the last finished task; F = the empirical Fisher (mean squared gradient of
the training loss over the task's batches), estimated at each task's end and accumulated across tasks
(online EWC, Schwarz et al. 2018: F <- decay * F + F_task; decay 1 sums them).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from gainlora.dist import rank_share
from gainlora.memory import distributed
from gainlora.methods.base import Batches, SeqLoRA
from gainlora.model.module import ContinualLM

PREFIX = "ewc"


def branch_parameters(model: ContinualLM) -> dict[str, Tensor]:
    """The current branch of every adapted layer as ``<layer>.A`` / ``<layer>.B``."""
    found = {}
    for name, layer in model.adapted.items():
        found[f"{name}.A"], found[f"{name}.B"] = layer.lora_A, layer.lora_B
    return found


class EWC(SeqLoRA):
    name = "ewc"

    def __init__(self, lambda_ewc: Annotated[float, Field(ge=0)] = 1e5,
                 decay: Annotated[float, Field(ge=0, le=1)] = 1.0,
                 max_batches: Annotated[int | None, Field(ge=1)] = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.lambda_ewc, self.decay = lambda_ewc, decay
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_end(model, task, batches)
        new = self.estimate_fisher(model, batches)
        params = branch_parameters(model)
        for key, value in new.items():
            self.fisher[key] = self.decay * self.fisher[key] + value if key in self.fisher else value
            self.anchor[key] = params[key].detach().float().clone()

    @torch.enable_grad()
    def estimate_fisher(self, model: ContinualLM, batches: Batches) -> dict[str, Tensor]:
        """Mean over (at most ``max_batches``) batches of the squared batch-loss gradient. Taken in
        eval mode (no dropout noise) through autograd.grad, which leaves ``.grad`` and any optimizer
        hooks untouched. Under DDP each rank takes every world-th batch and the sums are reduced."""
        params = branch_parameters(model)
        sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        count = torch.zeros((), dtype=torch.float64, device=model.device)
        was_training = model.training
        model.eval()
        try:
            pad = lambda b: torch.autograd.grad(model(model._to_device(b)), list(params.values()))  # noqa: E731
            for batch in rank_share(batches(), self.max_batches, pad=pad):
                loss = model(model._to_device(batch))
                for (key, _), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                    sums[key] += grad.float() ** 2
                count += 1
        finally:
            model.train(was_training)
        if distributed():
            for value in (*sums.values(), count):
                torch.distributed.all_reduce(value)
        return {k: v / count.clamp_min(1).float() for k, v in sums.items()}

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        if not self.fisher or not self.lambda_ewc:
            return None
        total = None
        for key, param in branch_parameters(model).items():
            if self.fisher[key].device != param.device:  # loaded on the CPU from the run directory
                self.fisher[key] = self.fisher[key].to(param.device)
                self.anchor[key] = self.anchor[key].to(param.device)
            term = (self.fisher[key] * (param - self.anchor[key]) ** 2).sum()
            total = term if total is None else total + term
        return 0.5 * self.lambda_ewc * total

    # -- persistence: float32 as held, so a resumed run continues bit for bit ---------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        out = {f"{PREFIX}.fisher.{k}": v.detach().cpu().contiguous() for k, v in self.fisher.items()}
        out.update({f"{PREFIX}.anchor.{k}": v.detach().cpu().contiguous() for k, v in self.anchor.items()})
        return out

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            for kind, store in (("fisher", self.fisher), ("anchor", self.anchor)):
                if key.startswith(f"{PREFIX}.{kind}."):
                    store[key[len(f"{PREFIX}.{kind}."):]] = value.float()
