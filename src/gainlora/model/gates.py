"""GainLoRA's gating modules (docs/method.md, "Gate g_i").

Gate i maps the pooled input embeddings p0(x) of an example to one coefficient a_i(x):
p1 = SiLU(G1 p0), p2 = SiLU(G2 p1), b = 4 cos(p2, k_i), a_i = |2 sigmoid(b) - 1|.
All gates are evaluated together with batched einsums; finished gates live in buffers and only
the current gate is trainable.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from gainlora.model.stacks import FrozenStack, Slot

Pool = Literal["mean", "padded_mean", "max"]
POOLS: tuple[str, ...] = get_args(Pool)


def pool_embeddings(embeds: Tensor, mask: Tensor, mode: Pool = "mean") -> Tensor:
    """Pool token embeddings (B, S, d) over valid tokens -> (B, d).

    ``mean`` divides by the example's own token count, so a coefficient never depends on the
    other examples of its batch. ``padded_mean`` divides by the padded batch length, as the
    reference code does (only for exact reproduction). ``max`` takes each coordinate's maximum over
    the example's own tokens (SAPT's query; its code also lets padding positions in).
    """
    if mode == "max":
        return embeds.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
    mask = mask.to(embeds.dtype).unsqueeze(-1)
    total = (embeds * mask).sum(1)
    if mode == "mean":
        return total / mask.sum(1).clamp_min(1.0)
    if mode == "padded_mean":
        return total / embeds.shape[1]
    raise ValueError(f"unknown gate pool {mode!r}; expected one of {POOLS}")


class GateBank(FrozenStack):
    """Every task's gate. ``forward(p0)`` returns coefficients (B, num_gates), task order."""

    slots = (Slot("G1", "frozen_G1"), Slot("G2", "frozen_G2"), Slot("key", "frozen_keys"))

    def __init__(self, dim: int, hidden: int = 100, key_scale: float = 4.0) -> None:
        super().__init__()
        self.dim, self.hidden, self.key_scale = dim, hidden, key_scale
        self.init_stacks({"frozen_G1": torch.zeros(0, hidden, dim), "frozen_G2": torch.zeros(0, dim, hidden),
                          "frozen_keys": torch.zeros(0, dim)})

    @property
    def num_gates(self) -> int:
        return self.num_entries

    def add_gate(self, *, copy_previous: bool, generator: torch.Generator | None = None,
                 G1: Tensor | None = None, G2: Tensor | None = None, key: Tensor | None = None) -> None:
        """Freeze the current gate and open a new one.

        With ``copy_previous`` (the initialization constraint) G1, G2 start as the previous gate's;
        otherwise they are drawn like ``nn.Linear`` weights. The key starts U(-1, 1); the
        initialization constraint later replaces it (see methods.gainlora).
        """
        self.freeze_current()
        if G1 is None or G2 is None:
            if copy_previous and self.num_frozen:
                G1, G2 = self.frozen_G1[-1], self.frozen_G2[-1]
            else:
                G1 = _linear_init(self.hidden, self.dim, generator)
                G2 = _linear_init(self.dim, self.hidden, generator)
        if key is None:
            key = torch.rand(self.dim, generator=generator) * 2 - 1
        self.open_current({"G1": G1, "G2": G2, "key": key})

    def gate(self, i: int) -> dict[str, Tensor]:
        """G1, G2 and key of gate i (0-based), frozen or current."""
        return self.entry(i)

    def entry_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of one gate (``gate(i)``, ``add_gate`` keywords), checked on restore."""
        return {"G1": (self.hidden, self.dim), "G2": (self.dim, self.hidden), "key": (self.dim,)}

    def features(self, p0: Tensor) -> tuple[Tensor, Tensor]:
        """p1 (B, n, hidden) and p2 (B, n, dim) of every gate."""
        G1, G2, _ = self.stacked()
        p0 = p0.to(G1.dtype)
        p1 = F.silu(torch.einsum("bd,nhd->bnh", p0, G1))
        p2 = F.silu(torch.einsum("bnh,ndh->bnd", p1, G2))
        return p1, p2

    def forward(self, p0: Tensor) -> Tensor:
        _, p2 = self.features(p0)
        _, _, keys = self.stacked()
        b = self.key_scale * F.cosine_similarity(p2, keys[None], dim=-1, eps=1e-12)
        # |2 sigmoid(b) - 1| == |tanh(b / 2)|, and tanh keeps full precision near b = 0.
        return torch.tanh(b / 2).abs()


def _linear_init(out_features: int, in_features: int, generator: torch.Generator | None) -> Tensor:
    bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default (kaiming-uniform with a=sqrt(5))
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
