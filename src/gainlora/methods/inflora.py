"""InfLoRA (Liang & Li, 2024): each new A spans input directions no old task uses, and is frozen.

Before task t, A_t <- (top-r left singular vectors of C_h - M_h M_h^T C_h)^T / sqrt(3) for every
adapted module, from the current task's input covariance C_h and the module's memory M_h; only B_t
trains. After the task, M_h grows by the GPM rule (docs/method.md, "Variants").
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from gainlora.memory import Subspace, threshold_at
from gainlora.methods.base import IncLoRA, MaxBatches, Needs, Stage, Threshold, subspace_tensors
from gainlora.model.features import Features
from gainlora.model.module import ContinualLM

CROSS_VALUE = re.compile(r"EncDecAttention\.v$")


class InfLoRA(IncLoRA):
    name = "inflora"

    def __init__(self, threshold: Threshold = 0.995, cross_value_features: Literal["encoder", "decoder"] = "encoder",
                 max_batches: MaxBatches = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.threshold = threshold
        # "decoder" reproduces the reference code, which feeds cross-attention v the covariance of
        # the decoder stream (what cross-attention q reads) instead of the encoder output v reads.
        self.cross_value_features = cross_value_features
        self.memories: dict[str, Subspace] = {}

    def needs(self, stage: Stage) -> Needs:
        return Needs(layers=True)  # A from the task's inputs (start); memories grown by them (end)

    def _covariances(self, feats: Features) -> dict[str, Tensor]:
        covs = dict(feats.layers)
        if self.cross_value_features == "decoder":
            for name in covs:
                if CROSS_VALUE.search(name):
                    covs[name] = covs[CROSS_VALUE.sub("EncDecAttention.q", name)]
        return covs

    def _spaces(self, model: ContinualLM, covs: dict[str, Tensor]) -> dict[str, Subspace]:
        """One memory per layer; layers that read the same input (q, v) share one object."""
        by_input: dict[int, Subspace] = {}
        for name, layer in model.adapted.items():
            if name not in self.memories:
                self.memories[name] = by_input.get(id(covs[name])) or Subspace(layer.in_features)
            by_input.setdefault(id(covs[name]), self.memories[name])
        return self.memories

    def init_branch(self, model: ContinualLM, task: int, feats: Features) -> None:
        covs = self._covariances(feats)
        spaces = self._spaces(model, covs)
        solved: dict[tuple[int, int], Tensor] = {}  # layers reading the same input share one SVD
        for name, layer in model.adapted.items():
            space = spaces[name]
            key = (id(covs[name]), id(space))
            if key not in solved:
                solved[key] = space.top_directions(covs[name], layer.rank).T / math.sqrt(3)
            with torch.no_grad():
                layer.lora_A.copy_(solved[key])
            layer.lora_A.requires_grad_(False)

    def update_memories(self, model: ContinualLM, task: int, feats: Features) -> None:
        eps = threshold_at(self.threshold, task, self.num_tasks)
        covs = self._covariances(feats)
        updated: set[int] = set()
        for name, space in self._spaces(model, covs).items():
            if id(space) not in updated:
                space.update(covs[name], eps)
                updated.add(id(space))

    def memory_tensors(self) -> dict[str, Tensor]:
        return subspace_tensors("inflora", self.memories)

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, basis in tensors.items():
            if key.startswith("inflora."):
                name = key[len("inflora."):]
                self.memories[name] = Subspace(basis.shape[0], basis)
