"""KIF-LoRA: the LoRA variant of KIF (Feng et al., "KIF: Knowledge Identification and Fusion for
Language Model Continual Learning", arXiv 2408.05200, the extension of TaSL, ACL 2024), following
the official code (WoodScene/TaSL: ``finetune_TasLoRA.py``, ``utils/lora_tailored_importance.py``,
``skill_consolidation_TasLoRA.py``). One LoRA branch is trained through every task (SeqLoRA).

- LoRA-tailored skill units: rank-1 component r of each adapted layer, (A[r, :], B[:, r]).
- Identification while a task trains: per element the second-order sensitivity
  I = |theta g - (theta g)^2 / 2|, smoothed I_bar <- b1 I_bar + (1 - b1) I, with uncertainty
  U_bar <- b2 U_bar + (1 - b2) |I - I_bar|; S = I_bar * U_bar. Unit r's importance is
  mean(S_B[:, r] S_A[r, :]^T) = mean(S_B[:, r]) * mean(S_A[r, :]), min-max normalised over all units.
- Fusion after the task (adaptive weighted consolidation): with p = the unit's importance now and
  q = its remembered importance, c = exp(p / tau) / (exp(p / tau) + exp(q / tau)) and
      A[r, :] <- c A[r, :] + (1 - c) A_prev[r, :],   B[:, r] <- c B[:, r] + (1 - c) B_prev[:, r]
  where prev is the fused branch after the last task; the remembered importance becomes
  normalise(0.3 p + 0.7 q).
- Training loss adds the orthogonality term of the reference's trainer:
      lambda_orth * mean over matrices (||A A^T - I||_F, ||B^T B - I||_F).
"""
from __future__ import annotations

from typing import Annotated

import torch
from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.callbacks.importance import ImportanceTracker
from gainlora.methods.base import Batches, MaxBatches, SeqLoRA
from gainlora.methods.ewc import branch_parameters
from gainlora.model.module import ContinualLM

PREFIX = "kif.importance."


class SecondOrderImportance(ImportanceTracker):
    """The reference's ``taylor="param_mix"`` sensitivity."""

    @staticmethod
    def sensitivity(param: Tensor, grad: Tensor) -> Tensor:
        first = param * grad
        return (first - 0.5 * first * first).abs()


def unit_scores(tracker: ImportanceTracker, model: ContinualLM) -> dict[str, Tensor]:
    """Layer name -> (r,) float64 importance of its rank-1 units; 0 where nothing was tracked."""
    out = {}
    for name, layer in model.adapted.items():
        a, b = f"{name}.A", f"{name}.B"
        if a not in tracker.avg_ipt or b not in tracker.avg_ipt:
            out[name] = torch.zeros(layer.rank, dtype=torch.float64)
            continue
        s_a = (tracker.avg_ipt[a] * tracker.avg_unc[a]).double().cpu()  # (r, d_in)
        s_b = (tracker.avg_ipt[b] * tracker.avg_unc[b]).double().cpu()  # (d_out, r)
        out[name] = s_b.mean(0) * s_a.mean(1)
    return out


def normalise_units(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Min-max over every unit of every layer (all 0 if they are all equal)."""
    values = torch.cat(list(scores.values()))
    low, span = values.min(), values.max() - values.min()
    return {k: (v - low) / span if span > 0 else torch.zeros_like(v) for k, v in scores.items()}


def fusion_weights(present: dict[str, Tensor], previous: dict[str, Tensor], tau: float) -> dict[str, Tensor]:
    """exp(p / tau) / (exp(p / tau) + exp(q / tau)), the weight of the present unit."""
    return {k: torch.sigmoid((present[k] - previous[k]) / tau) for k in present}


class KIFLoRA(SeqLoRA):
    name = "kiflora"

    def __init__(self, beta1: Annotated[float, Field(gt=0, lt=1)] = 0.85,
                 beta2: Annotated[float, Field(gt=0, lt=1)] = 0.85,
                 tau: Annotated[float, Field(gt=0)] = 0.25,
                 lambda_orth: Annotated[float, Field(ge=0)] = 0.1,
                 max_batches: MaxBatches = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.beta1, self.beta2, self.tau, self.lambda_orth = beta1, beta2, tau, lambda_orth
        self.tracker = SecondOrderImportance(beta1, beta2, branch_parameters)
        self.scores: dict[str, Tensor] = {}  # remembered importance per layer, (r,) float64
        self.previous: dict[str, tuple[Tensor, Tensor]] = {}  # the fused branch after the last task

    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_start(model, task, batches)
        self.tracker = SecondOrderImportance(self.beta1, self.beta2, branch_parameters)
        # the branch now is the last fused one (also after a resume: the loop restores it)
        self.previous = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                         for name, layer in model.adapted.items()}

    def callbacks(self) -> list[Callback]:
        return [*super().callbacks(), self.tracker]

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        if not self.lambda_orth:
            return None
        terms = []
        for layer in model.adapted.values():
            if layer.lora_A is None:
                continue
            A, B = layer.lora_A, layer.lora_B
            eye = torch.eye(layer.rank, device=A.device, dtype=A.dtype)
            terms += [torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)]
        return self.lambda_orth * torch.stack(terms).mean() if terms else None

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_end(model, task, batches)
        present = normalise_units(unit_scores(self.tracker, model))
        if not self.scores:  # the first task: nothing to fuse with
            self.scores = present
            return
        weights = fusion_weights(present, self.scores, self.tau)
        with torch.no_grad():
            for name, layer in model.adapted.items():
                c = weights[name].to(layer.lora_A)
                A_prev, B_prev = self.previous[name]
                layer.lora_A.copy_(c[:, None] * layer.lora_A + (1 - c)[:, None] * A_prev)
                layer.lora_B.copy_(c * layer.lora_B + (1 - c) * B_prev)
        self.scores = normalise_units({k: 0.3 * present[k] + 0.7 * self.scores[k] for k in present})

    def memory_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{k}": v.contiguous() for k, v in self.scores.items()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        found = {k[len(PREFIX):]: v.double() for k, v in tensors.items() if k.startswith(PREFIX)}
        if found:
            self.scores = found
