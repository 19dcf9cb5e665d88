"""TaSL (Feng et al., ACL 2024, "TaSL: Task Skill Localization and Consolidation"), on one LoRA
branch trained through every task (SeqLoRA), following the official code (WoodScene/TaSL:
``utils/lora_importance.py``, ``skill_consolidation.py``).

Skill units are the branch's matrices: each adapted layer's A and each B.
- Localization, while a task trains (``callbacks.importance``): per element, the sensitivity
  I = |theta * grad| smoothed as I_bar <- b1 I_bar + (1 - b1) I and its uncertainty
  U_bar <- b2 U_bar + (1 - b2) |I - I_bar|; a unit's importance is mean(I_bar * U_bar), min-max
  normalised over the units.
- Consolidation, after the task: with "important" = above the (1 - top_fraction) percentile,
      previous and present important -> 0.3 present + 0.7 previous
      previous only                   -> previous
      present only                    -> present
      neither                         -> 0.5 present + 0.5 previous
  where previous = the consolidated branch after the last task and present = the branch now; the
  result is the branch the next task starts from. The remembered importance becomes
  normalise(0.3 present + 0.7 previous).
"""
from __future__ import annotations

from typing import Annotated

import torch
from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.callbacks.importance import ImportanceTracker
from gainlora.methods.base import Batches, SeqLoRA
from gainlora.methods.ewc import branch_parameters
from gainlora.model.module import ContinualLM

PREFIX = "tasl.importance."


def normalise(scores: dict[str, float]) -> dict[str, float]:
    low, high = min(scores.values()), max(scores.values())
    span = high - low
    return {k: (v - low) / span if span > 0 else 0.0 for k, v in scores.items()}


def important(scores: dict[str, float], top_fraction: float) -> set[str]:
    """Units strictly above the (1 - top_fraction) percentile (numpy's linear interpolation)."""
    values = torch.tensor(list(scores.values()), dtype=torch.float64)
    threshold = torch.quantile(values, 1 - top_fraction).item()
    return {k for k, v in scores.items() if v > threshold}


def consolidate(present: dict[str, Tensor], previous: dict[str, Tensor], present_scores: dict[str, float],
                previous_scores: dict[str, float], top_fraction: float) -> dict[str, Tensor]:
    now, before = important(present_scores, top_fraction), important(previous_scores, top_fraction)
    merged = {}
    for key, value in present.items():
        if key in before:
            merged[key] = 0.3 * value + 0.7 * previous[key] if key in now else previous[key].clone()
        else:
            merged[key] = value.clone() if key in now else 0.5 * value + 0.5 * previous[key]
    return merged


class TaSL(SeqLoRA):
    name = "tasl"

    def __init__(self, beta1: Annotated[float, Field(gt=0, lt=1)] = 0.85,
                 beta2: Annotated[float, Field(gt=0, lt=1)] = 0.85,
                 top_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
                 max_batches: Annotated[int | None, Field(ge=1)] = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.beta1, self.beta2, self.top_fraction = beta1, beta2, top_fraction
        self.tracker = ImportanceTracker(beta1, beta2, branch_parameters)
        self.scores: dict[str, float] = {}  # remembered (consolidated) importance per unit
        self.previous: dict[str, Tensor] = {}  # the consolidated branch after the last task

    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_start(model, task, batches)
        self.tracker = ImportanceTracker(self.beta1, self.beta2, branch_parameters)
        # the branch now is the last consolidated one (also after a resume: the loop restores it)
        self.previous = {k: p.detach().clone() for k, p in branch_parameters(model).items()}

    def callbacks(self) -> list[Callback]:
        return [*super().callbacks(), self.tracker]

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_end(model, task, batches)
        params = branch_parameters(model)
        present_scores = normalise(self.tracker.scores(params))
        if not self.scores:  # the first task: nothing to consolidate with
            self.scores = present_scores
            return
        merged = consolidate({k: p.detach() for k, p in params.items()}, self.previous, present_scores,
                             self.scores, self.top_fraction)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(merged[key])
        self.scores = normalise({k: 0.3 * present_scores[k] + 0.7 * self.scores[k] for k in present_scores})

    def memory_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{k}": torch.tensor([v], dtype=torch.float64) for k, v in self.scores.items()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        found = {k[len(PREFIX):]: float(v.item()) for k, v in tensors.items() if k.startswith(PREFIX)}
        if found:
            self.scores = found
