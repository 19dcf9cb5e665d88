"""SAPT's shared attentive learning and selection (Zhao et al., ACL 2024), as the model's gate module.

One key per task and one query network shared by all tasks:
q = LayerNorm(SiLU(W2 W1 p0)), s_i = k_i . q / tau with tau = temperature * sqrt(d),
a = softmax_i(s): the coefficients (B, num_tasks) that weigh the LoRA branches through the same
``BranchContext`` GainLoRA's gates use (a softmax across tasks instead of independent sigmoids).
Finished tasks' keys live in a frozen buffer; the current key and the query network train. The
query network is not per task: it keeps training through every task (SAPT's ``trans_input``), so
the method saves its latest state with the task's memories.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gainlora.model.gates import _linear_init
from gainlora.model.stacks import FrozenStack, Slot


class TaskAttention(FrozenStack):
    """``forward(p0)`` -> attention weights (B, num_gates) over tasks, task order; rows sum to 1."""

    slots = (Slot("key", "frozen_keys"),)

    def __init__(self, dim: int, hidden: int = 100, temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.hidden, self.temperature = dim, hidden, temperature
        self.tau = temperature * math.sqrt(dim)
        self.query = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False),
                                   nn.SiLU(), nn.LayerNorm(dim))
        generator = torch.Generator().manual_seed(seed)  # the same draw on every rank and every attempt
        with torch.no_grad():
            for linear in (self.query[0], self.query[1]):
                linear.weight.copy_(_linear_init(*linear.weight.shape, generator))
        self.init_stacks({"frozen_keys": torch.zeros(0, dim)})

    @property
    def num_gates(self) -> int:
        return self.num_entries

    def add_gate(self, *, copy_previous: bool = False, generator: torch.Generator | None = None,
                 key: Tensor | None = None) -> None:
        """Freeze the current key and open a new one, U(-1, 1) as SAPT draws it. ``copy_previous``
        is accepted for the gate interface and has no meaning here (keys are never copied)."""
        if key is None:
            key = torch.rand(self.dim, generator=generator) * 2 - 1
        self.open_current({"key": key})

    def gate(self, i: int) -> dict[str, Tensor]:
        """Task i's key (what its gate.safetensors holds)."""
        return self.entry(i)

    def entry_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"key": (self.dim,)}

    def flops_per_example(self) -> int:
        """Forward matmul FLOPs for one example (gainlora.cost): the shared query network
        (d -> h -> d) once, then a dot with each task's key."""
        return 2 * 2 * self.dim * self.hidden + 2 * self.num_gates * self.dim

    def scores(self, p0: Tensor) -> Tensor:
        """Logits s (B, n) before the softmax (the reflection loss's log-softmax reads them)."""
        (keys,) = self.stacked()
        q = self.query(p0.to(keys.dtype))
        return q @ keys.T / self.tau

    def forward(self, p0: Tensor) -> Tensor:
        return torch.softmax(self.scores(p0), dim=-1)
