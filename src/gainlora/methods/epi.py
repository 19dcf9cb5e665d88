"""EPI (Wang et al., ACL 2023, "Rehearsal-free Continual Language Learning via Efficient Parameter
Isolation"), with a LoRA branch per task where the paper prepends a prefix per task; following the
official code (Dicer-Zz/EPI: ``model/epi.py``, ``trainers/epi.py``, ``utils/assets.py``).

- Isolation: task t trains only its own branch; old branches take no part (coefficient 0), in
  training and in the task's own validation (the reference validates with the oracle task id).
- Statistics, after task t: the frozen backbone's (no branch) last hidden states, mean-pooled over
  the source tokens, of the task's training inputs. Grouped by class (here: the target text), each
  class c gives a mean mu_{t,c}; the task's covariance S_t is the average of its per-class
  covariances; the shared covariance is S = (1/T) sum_t S_t, its pseudo-inverse P = pinv(S).
- Task identification, at test time: for an input x (its pooled frozen features),
      t*(x) = argmin_t min_c (x - mu_{t,c})^T P (x - mu_{t,c})
  and the input is answered by branch t* alone (one-hot coefficients through ``ContinualLM.router``).
"""
from __future__ import annotations

import functools
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from gainlora.dist import rank_share, shard
from gainlora.methods.base import Batches, IncLoRA, MaxBatches
from gainlora.model.features import frozen_pooled
from gainlora.model.module import ContinualLM

PREFIX = "epi"


def class_keys(labels: Tensor) -> list[tuple[int, ...]]:
    """Each example's answer token ids: its class for a classification task."""
    return [tuple(row[row != -100].tolist()) for row in labels]


def class_statistics(feats: Tensor, keys: list, max_classes: int) -> tuple[Tensor, Tensor]:
    """(class means (C, d), the task's covariance (d, d)): the average of the per-class covariances
    (torch.cov, unbiased, as the reference). A task with more than ``max_classes`` distinct answers
    (generation) is one class. Classes of one example add a mean but no covariance."""
    distinct = list(dict.fromkeys(keys))
    groups = [torch.tensor([k == c for k in keys]) for c in distinct] if len(distinct) <= max_classes else []
    groups = groups or [torch.ones(len(keys), dtype=torch.bool)]
    means = torch.stack([feats[g].mean(0) for g in groups])
    covs = [torch.cov(feats[g].T) for g in groups if g.sum() > 1]
    if covs:
        cov = torch.stack(covs).mean(0)
    else:
        cov = torch.cov(feats.T) if len(feats) > 1 else torch.zeros(feats.shape[1], feats.shape[1], dtype=feats.dtype)
    return means, cov.reshape(feats.shape[1], feats.shape[1])


class EPI(IncLoRA):
    name = "epi"

    def __init__(self, max_classes: Annotated[int, Field(ge=1)] = 64, max_batches: MaxBatches = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.max_classes = max_classes
        self.means: list[Tensor] = []  # per task: class means (C_t, d), float64
        self.cov_sum: Tensor | None = None  # sum over tasks of each task's covariance
        self._precision: Tensor | None = None  # pinv(cov_sum / tasks), recomputed from the two above

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        model.router = functools.partial(self.route, model)

    # -- routing ----------------------------------------------------------------------------------
    def route(self, model: ContinualLM, batch: dict) -> Tensor | None:
        """One-hot coefficients (batch, branches): the task being learned (whose statistics do not
        exist yet) uses its own branch; once every branch has statistics, the identified task's."""
        n = model.num_branches
        if n == 0:
            return None
        device = batch["input_ids"].device
        if len(self.means) < n:
            chosen = torch.full((batch["input_ids"].shape[0],), n - 1, device=device)
        else:
            chosen = self.identify(frozen_pooled(model, batch).cpu()).to(device)
        return torch.nn.functional.one_hot(chosen, n).float()

    def identify(self, feats: Tensor) -> Tensor:
        """argmin over tasks of the smallest squared Mahalanobis distance to the task's class means."""
        means = torch.cat(self.means)  # (K, d)
        owner = torch.cat([torch.full((len(m),), t) for t, m in enumerate(self.means)])
        P = self.precision()
        x = feats.to(P.dtype)
        # (x - mu)^T P (x - mu) = x P x - 2 x P mu + mu P mu, without forming (batch, K, d)
        Pm = means @ P
        dist = (x @ P * x).sum(1, keepdim=True) - 2 * x @ Pm.T + (Pm * means).sum(1)
        per_task = torch.full((len(x), len(self.means)), torch.inf, dtype=dist.dtype)
        per_task.scatter_reduce_(1, owner.expand(len(x), -1), dist, "amin")
        return per_task.argmin(1)

    def precision(self) -> Tensor:
        if self._precision is None:
            self._precision = torch.linalg.pinv(self.cov_sum / len(self.means), hermitian=True)
        return self._precision

    # -- statistics after each task -----------------------------------------------------------
    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_end(model, task, batches)
        feats, keys = self.task_features(model, batches)
        means, cov = class_statistics(feats, keys, self.max_classes)
        self.means.append(means)
        self.cov_sum = cov if self.cov_sum is None else self.cov_sum + cov
        self._precision = None

    def task_features(self, model: ContinualLM, batches: Batches) -> tuple[Tensor, list]:
        """Pooled frozen features (in eval mode, as the reference) and class keys of (at most
        ``max_batches``) training batches; under DDP each rank takes every world-th batch, then all gather."""
        _, world = shard()
        feats, keys = [], []
        pad = lambda b: frozen_pooled(model, model._to_device(b)).cpu()  # noqa: E731
        for batch in rank_share(batches(), self.max_batches, pad=pad):
            batch = model._to_device(batch)
            feats.append(frozen_pooled(model, batch).cpu())
            keys.extend(class_keys(batch["labels"]))
        local = (torch.cat(feats) if feats else torch.zeros(0, 0, dtype=torch.float64), keys)
        if world > 1:
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, local)
            local = (torch.cat([f for f, _ in parts if len(f)]), [k for _, ks in parts for k in ks])
        return local

    # -- persistence: float64 as held, so a resumed run routes exactly as an uninterrupted one -------
    def memory_tensors(self) -> dict[str, Tensor]:
        out = {f"{PREFIX}.means.{t}": m.contiguous() for t, m in enumerate(self.means)}
        if self.cov_sum is not None:
            out[f"{PREFIX}.cov_sum"] = self.cov_sum.contiguous()
        return out

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        found = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith(f"{PREFIX}.means.")}
        if found:
            self.means = [found[t].double() for t in range(len(found))]
            self.cov_sum = tensors[f"{PREFIX}.cov_sum"].double()
            self._precision = None
