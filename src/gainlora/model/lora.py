"""The gated multi-branch LoRA layer.

Every adapted ``nn.Linear`` W becomes ``y = W h + s * sum_i a_i(x) B_i A_i h`` (METHOD.md, Branches).
All branches are stacked so the cost is two matrix products whatever the number of tasks:
``z = (h @ A_all^T) * gate``, ``y += s * z @ B_all^T``. Finished branches live in buffers (never seen
by an optimizer); only the current branch is made of Parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BranchContext:
    """Per-forward state shared by all adapted layers of one model.

    ``coeffs`` (batch x branches) are the gate coefficients of the examples now in the backbone;
    ``None`` means every coefficient is 1 (the gate-free baselines). ``masks`` holds the valid-token
    mask of each stream ("encoder", "decoder") for covariance collection; ``collector`` is called
    with (layer, input) by every layer while features are collected.
    """

    coeffs: Tensor | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)
    collector: Callable[["GatedLoRALinear", Tensor], None] | None = None

    def reset(self) -> None:
        self.coeffs = None
        self.masks = {}
        self.collector = None


class GatedLoRALinear(nn.Module):
    """A frozen linear layer plus stacked, gated LoRA branches.

    The base weight keeps its parameter name (``weight``/``bias``) so checkpoints of the backbone
    load unchanged. ``stream`` names which token stream feeds this layer (its mask in the context).
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, context: BranchContext,
                 stream: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.stream = stream
        # Not a submodule: one context object is shared by every layer of the model.
        object.__setattr__(self, "context", context)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.register_buffer("frozen_A", torch.zeros(0, self.in_features, **factory))
        self.register_buffer("frozen_B", torch.zeros(self.out_features, 0, **factory))
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None

    # -- registry ---------------------------------------------------------------------------
    @property
    def num_frozen(self) -> int:
        return self.frozen_A.shape[0] // self.rank

    @property
    def num_branches(self) -> int:
        return self.num_frozen + (self.lora_A is not None)

    def add_branch(self, A: Tensor | None = None, B: Tensor | None = None) -> None:
        """Freeze the current branch (if any) and open a new trainable one.

        Defaults follow LoRA: A kaiming-uniform, B zero, so a new branch starts as a no-op.
        """
        self.freeze_current()
        device = self.frozen_A.device
        if A is None:
            A = torch.empty(self.rank, self.in_features, device=device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if B is None:
            B = torch.zeros(self.out_features, self.rank, device=device)
        self.lora_A = nn.Parameter(A.detach().to(device, torch.float32).clone())
        self.lora_B = nn.Parameter(B.detach().to(device, torch.float32).clone())

    def freeze_current(self) -> None:
        """Move the current branch into the frozen stacks (bit-exact copy)."""
        if self.lora_A is None:
            return
        self.frozen_A = torch.cat([self.frozen_A, self.lora_A.detach()], 0)
        self.frozen_B = torch.cat([self.frozen_B, self.lora_B.detach()], 1)
        self.lora_A = self.lora_B = None

    def branch(self, i: int) -> tuple[Tensor, Tensor]:
        """(A_i, B_i) of branch i (0-based), frozen or current."""
        if i < self.num_frozen:
            rows = slice(i * self.rank, (i + 1) * self.rank)
            return self.frozen_A[rows], self.frozen_B[:, rows]
        if i == self.num_frozen and self.lora_A is not None:
            return self.lora_A, self.lora_B
        raise IndexError(f"branch {i} of {self.num_branches}")

    def stacked(self) -> tuple[Tensor, Tensor]:
        if self.lora_A is None:
            return self.frozen_A, self.frozen_B
        if self.num_frozen == 0:
            return self.lora_A, self.lora_B
        return (torch.cat([self.frozen_A, self.lora_A], 0),
                torch.cat([self.frozen_B, self.lora_B], 1))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        y = F.linear(h, self.weight, self.bias)
        ctx = self.context
        if ctx.collector is not None:
            ctx.collector(self, h)
        n = self.num_branches
        if n == 0:
            return y
        A, B = self.stacked()
        z = F.linear(self.dropout(h), A.to(h.dtype))  # (..., n*r)
        if ctx.coeffs is not None:
            z = z * self._expanded_gates(ctx.coeffs, h, n).to(z.dtype)
        return y + F.linear(z, B.to(z.dtype)) * self.scale

    def _expanded_gates(self, coeffs: Tensor, h: Tensor, n: int) -> Tensor:
        if coeffs.shape[1] != n:
            raise RuntimeError(f"{coeffs.shape[1]} gate coefficients for {n} branches")
        batch = h.shape[0]
        if batch != coeffs.shape[0]:
            # generate() repeats each example's rows consecutively (beams, returned sequences).
            if batch % coeffs.shape[0]:
                raise RuntimeError(f"batch {batch} is not a multiple of {coeffs.shape[0]} gated examples")
            coeffs = coeffs.repeat_interleave(batch // coeffs.shape[0], dim=0)
        g = coeffs.repeat_interleave(self.rank, dim=1)  # (batch, n*r)
        return g.view(batch, *([1] * (h.dim() - 2)), n * self.rank)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, "
                f"scale={self.scale:g}, branches={self.num_branches}, stream={self.stream}")
