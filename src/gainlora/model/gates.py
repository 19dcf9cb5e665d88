"""GainLoRA's gating modules (METHOD.md, "Gate g_i").

Gate i maps the pooled input embeddings p0(x) of an example to one coefficient a_i(x):
p1 = SiLU(G1 p0), p2 = SiLU(G2 p1), b = 4 cos(p2, k_i), a_i = |2 sigmoid(b) - 1|.
All gates are evaluated together with batched einsums; finished gates live in buffers and only
the current gate is trainable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLS = ("mean", "padded_mean")


def pool_embeddings(embeds: Tensor, mask: Tensor, mode: str = "mean") -> Tensor:
    """Pool token embeddings (B, S, d) over valid tokens -> (B, d).

    ``mean`` divides by the example's own token count, so a coefficient never depends on the
    other examples of its batch. ``padded_mean`` divides by the padded batch length, as the
    reference code does (only for exact reproduction).
    """
    mask = mask.to(embeds.dtype).unsqueeze(-1)
    total = (embeds * mask).sum(1)
    if mode == "mean":
        return total / mask.sum(1).clamp_min(1.0)
    if mode == "padded_mean":
        return total / embeds.shape[1]
    raise ValueError(f"unknown gate pool {mode!r}; expected one of {POOLS}")


class GateBank(nn.Module):
    """Every task's gate. ``forward(p0)`` returns coefficients (B, num_gates), task order."""

    def __init__(self, dim: int, hidden: int = 100, key_scale: float = 4.0) -> None:
        super().__init__()
        self.dim, self.hidden, self.key_scale = dim, hidden, key_scale
        self.register_buffer("frozen_G1", torch.zeros(0, hidden, dim))
        self.register_buffer("frozen_G2", torch.zeros(0, dim, hidden))
        self.register_buffer("frozen_keys", torch.zeros(0, dim))
        self.G1: nn.Parameter | None = None
        self.G2: nn.Parameter | None = None
        self.key: nn.Parameter | None = None

    @property
    def num_frozen(self) -> int:
        return self.frozen_G1.shape[0]

    @property
    def num_gates(self) -> int:
        return self.num_frozen + (self.G1 is not None)

    def add_gate(self, *, copy_previous: bool, generator: torch.Generator | None = None,
                 G1: Tensor | None = None, G2: Tensor | None = None, key: Tensor | None = None) -> None:
        """Freeze the current gate and open a new one.

        With ``copy_previous`` (the initialization constraint) G1, G2 start as the previous gate's;
        otherwise they are drawn like ``nn.Linear`` weights. The key starts U(-1, 1); the
        initialization constraint later replaces it (see methods.gainlora).
        """
        self.freeze_current()
        device = self.frozen_G1.device
        if G1 is None or G2 is None:
            if copy_previous and self.num_frozen:
                G1, G2 = self.frozen_G1[-1], self.frozen_G2[-1]
            else:
                G1 = _linear_init(self.hidden, self.dim, generator)
                G2 = _linear_init(self.dim, self.hidden, generator)
        if key is None:
            key = torch.rand(self.dim, generator=generator) * 2 - 1
        self.G1 = nn.Parameter(G1.detach().to(device, torch.float32).clone())
        self.G2 = nn.Parameter(G2.detach().to(device, torch.float32).clone())
        self.key = nn.Parameter(key.detach().to(device, torch.float32).clone())

    def freeze_current(self) -> None:
        if self.G1 is None:
            return
        self.frozen_G1 = torch.cat([self.frozen_G1, self.G1.detach()[None]])
        self.frozen_G2 = torch.cat([self.frozen_G2, self.G2.detach()[None]])
        self.frozen_keys = torch.cat([self.frozen_keys, self.key.detach()[None]])
        self.G1 = self.G2 = self.key = None

    def gate(self, i: int) -> dict[str, Tensor]:
        if i < self.num_frozen:
            return {"G1": self.frozen_G1[i], "G2": self.frozen_G2[i], "key": self.frozen_keys[i]}
        if i == self.num_frozen and self.G1 is not None:
            return {"G1": self.G1, "G2": self.G2, "key": self.key}
        raise IndexError(f"gate {i} of {self.num_gates}")

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.G1 is None:
            return self.frozen_G1, self.frozen_G2, self.frozen_keys
        return (torch.cat([self.frozen_G1, self.G1[None]]), torch.cat([self.frozen_G2, self.G2[None]]),
                torch.cat([self.frozen_keys, self.key[None]]))

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
