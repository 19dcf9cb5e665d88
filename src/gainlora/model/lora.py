"""The gated multi-branch LoRA layer.

Every adapted ``nn.Linear`` W becomes ``y = W h + s * sum_i a_i(x) B_i A_i h`` (docs/method.md, "Branches").
All branches are stacked so the cost is two matrix products whatever the number of tasks:
``z = (h @ A_all^T) * gate``, ``y += s * z @ B_all^T``. Finished branches live in buffers (never seen
by an optimizer); only the current branch is made of Parameters. ``GatedLoRAFunction`` gives these
products a hand-written backward (see there why); plain autograd remains for LoRA dropout.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gainlora.model.stacks import FrozenStack, Slot


@dataclass
class BranchContext:
    """The gate coefficients of the examples now in the backbone, shared by all adapted layers of one model.

    ``coeffs`` (batch x branches); ``None`` means every coefficient is 1 (the gate-free baselines,
    and any forward outside ``gating``). Layers are called by the backbone with the hidden states
    only, so the coefficients reach them here; ``ContinualLM.gated`` is the one writer.
    """

    coeffs: Tensor | None = None
    # Per-forward caches, emptied whenever ``coeffs`` is assigned: the coefficients expanded per
    # (rows, rank), built once and shared by every layer; and each layer's stacked branches without
    # autograd, built once per generate() call instead of once per token.
    _expanded: dict[tuple[int, int], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _stacks: dict[int, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "coeffs":
            super().__setattr__("_expanded", {})
            super().__setattr__("_stacks", {})
        super().__setattr__(name, value)

    @contextmanager
    def gating(self, coeffs: Tensor | None) -> Iterator[None]:
        """Every adapted layer weighs its branches by ``coeffs`` inside the block, by 1 after it."""
        self.coeffs = coeffs
        try:
            yield
        finally:
            self.coeffs = None

    def expanded_coeffs(self, rows: int, rank: int) -> Tensor:
        """(rows, n * rank): each coefficient repeated ``rank`` times, each example's row repeated
        for the rows generate() made of it (beams, returned sequences are consecutive)."""
        key = (rows, rank)
        if key not in self._expanded:
            coeffs = self.coeffs
            batch, n = coeffs.shape
            if rows != batch:
                if rows % batch:
                    raise RuntimeError(f"batch {rows} is not a multiple of {batch} gated examples")
                coeffs = coeffs[:, None].expand(batch, rows // batch, n).reshape(rows, n)
            self._expanded[key] = coeffs[:, :, None].expand(rows, n, rank).reshape(rows, n * rank)
        return self._expanded[key]


def _fused_forward(h: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, gates: Tensor | None,
                   scale: float, keep_z: bool = True) -> tuple[Tensor, Tensor | None]:
    """(y, z) with y = h W^T + b + s ((h A^T) * g) B^T, z = h A^T (rows flattened; None unless ``keep_z``).

    The sum (and without ``keep_z`` the gating) is done in place: an encoder batch's (T, d)
    temporaries are megabytes, and each fresh one is page faults plus a copy. The same products in
    the same order, so the same bits (tests/unit/test_fast_eval.py)."""
    lead = h.shape[:-1]
    x = h.reshape(-1, h.shape[-1])
    z = x @ A.T  # (T, n r)
    if gates is None:
        zg = z
    elif keep_z:  # the backward reads the ungated z
        zg = (z.view(*lead, -1) * gates).view(z.shape)
    else:
        zg = z.view(*lead, -1).mul_(gates).view(z.shape)
    y = F.linear(x, weight, bias)
    # in place through out= (addmm_ computes the same, but FlopCounterMode does not count it: gainlora.cost)
    torch.addmm(y, zg, B.T, alpha=scale, out=y)  # scale and sum folded into the product
    return y.view(*lead, -1), (z if keep_z else None)


class GatedLoRAFunction(torch.autograd.Function):
    """``y = h W^T + b + s ((h A^T) * g) B^T`` with A = [frozen_A; A_cur], B = [frozen_B, B_cur].

    Forward: the two stacked products autograd would run. Backward, why hand-written: autograd
    would compute the weight gradient of every stacked branch (frozen ones included, then dropped
    by the concatenation), and B's as a (d_out x T) @ (T x n r) product, a shape MKL runs several
    times slower than its transpose. Here only the current branch's gradients are formed, both as
    (r x T) @ (T x d) products.

    ``h`` (..., d_in); ``gates`` None or broadcastable to (..., n r); W and b frozen.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, frozen_A: Tensor, A: Tensor | None,
                frozen_B: Tensor, B: Tensor | None, gates: Tensor | None, scale: float) -> Tensor:
        A_all = frozen_A if A is None else (torch.cat([frozen_A, A]) if frozen_A.shape[0] else A)
        B_all = frozen_B if B is None else (torch.cat([frozen_B, B], 1) if frozen_B.shape[1] else B)
        y, z = _fused_forward(h, weight, bias, A_all, B_all, gates, scale)
        ctx.scale, ctx.frozen, ctx.lead = scale, frozen_A.shape[0], h.shape[:-1]
        ctx.save_for_backward(h, weight, A_all, B_all, z, gates)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        h, weight, A_all, B_all, z, gates = ctx.saved_tensors
        k, scale, lead = ctx.frozen, ctx.scale, ctx.lead
        need_h, _, _, _, need_A, _, need_B, need_gates, _ = ctx.needs_input_grad
        x = h.reshape(-1, h.shape[-1])
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_zg = (gy @ B_all).mul_(scale)  # (T, n r)
        grad_h = grad_A = grad_B = grad_gates = None
        if gates is None:
            grad_z = grad_zg
        else:
            if need_gates:
                grad_gates = (grad_zg * z).view(*lead, -1).sum_to_size(gates.shape)
            grad_z = (grad_zg.view(*lead, -1) * gates).view(grad_zg.shape)
        if need_h:
            grad_h = torch.addmm(gy @ weight, grad_z, A_all).view(*lead, -1)
        if need_A:
            grad_A = grad_z[:, k:].T @ x
        if need_B:
            zg_cur = z[:, k:]
            if gates is not None:
                zg_cur = (zg_cur.view(*lead, -1) * gates[..., k:]).view(zg_cur.shape)
            grad_B = (zg_cur.T @ gy).T.mul_(scale)
        return grad_h, None, None, None, grad_A, None, grad_B, grad_gates, None


class GatedLoRALinear(FrozenStack):
    """A frozen linear layer plus stacked, gated LoRA branches.

    The base weight keeps its parameter name (``weight``/``bias``) so checkpoints of the backbone
    load unchanged. ``stream`` names which token stream feeds this layer ("encoder" or "decoder"),
    so feature collection knows which tokens of its input are real.
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
        # Branch i is rows i r..(i+1) r of A and the same columns of B.
        self.slots = (Slot("lora_A", "frozen_A", dim=0, block=rank), Slot("lora_B", "frozen_B", dim=1, block=rank))
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.init_stacks({"frozen_A": torch.zeros(0, self.in_features, **factory),
                          "frozen_B": torch.zeros(self.out_features, 0, **factory)})

    # -- registry ---------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return self.num_entries

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
        self.open_current({"lora_A": A, "lora_B": B})

    def branch(self, i: int) -> tuple[Tensor, Tensor]:
        """(A_i, B_i) of branch i (0-based), frozen or current."""
        if not 0 <= i < self.num_branches:
            raise IndexError(f"branch {i} of {self.num_branches}")
        entry = self.entry(i)
        return entry["lora_A"], entry["lora_B"]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        ctx = self.context
        n = self.num_branches
        if n == 0:
            return F.linear(h, self.weight, self.bias)
        gates = self._expanded_gates(ctx.coeffs, h, n) if ctx.coeffs is not None else None
        lora_dropout = self.training and not isinstance(self.dropout, nn.Identity)
        if lora_dropout or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return self._forward_autograd(h, gates)
        device = h.device.type
        if torch.is_autocast_enabled(device):  # the same casts autocast applies to F.linear
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self._forward_fused(h, gates, dtype)
        return self._forward_fused(h, gates, h.dtype)

    def _forward_fused(self, h: Tensor, gates: Tensor | None, dtype: torch.dtype) -> Tensor:
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        trainable = any(t is not None and t.requires_grad for t in (h, gates, self.lora_A, self.lora_B))
        if not (torch.is_grad_enabled() and trainable):  # generation, feature collection
            A, B = self._inference_stacks(dtype)
            return _fused_forward(h.to(dtype), cast(self.weight), cast(self.bias), A, B, cast(gates), self.scale,
                                  keep_z=False)[0]
        return GatedLoRAFunction.apply(h.to(dtype), cast(self.weight), cast(self.bias), cast(self.frozen_A),
                                       cast(self.lora_A), cast(self.frozen_B), cast(self.lora_B), cast(gates),
                                       self.scale)

    def _inference_stacks(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """stacked() without autograd, kept in the context until its next forward; rebuilt if any
        branch tensor was replaced or changed in place meanwhile (identity, version counter)."""
        sources = (self.frozen_A, self.frozen_B, self.lora_A, self.lora_B)
        versions = tuple(None if t is None else t._version for t in sources)
        cached = self.context._stacks.get(id(self))
        if (cached is None or cached[1] != versions or cached[2] != dtype
                or any(a is not b for a, b in zip(cached[0], sources))):
            with torch.no_grad():
                A, B = self.stacked()
            cached = (sources, versions, dtype, A.to(dtype), B.to(dtype))
            self.context._stacks[id(self)] = cached
        return cached[3], cached[4]

    def _forward_autograd(self, h: Tensor, gates: Tensor | None) -> Tensor:
        """The same sum through plain autograd (LoRA dropout, or a trainable base layer)."""
        y = F.linear(h, self.weight, self.bias)
        A, B = self.stacked()
        z = F.linear(self.dropout(h), A.to(h.dtype))  # (..., n*r)
        if gates is not None:
            z = z * gates.to(z.dtype)
        return y + F.linear(z, B.to(z.dtype)) * self.scale

    def _expanded_gates(self, coeffs: Tensor, h: Tensor, n: int) -> Tensor:
        if coeffs.shape[1] != n:
            raise RuntimeError(f"{coeffs.shape[1]} gate coefficients for {n} branches")
        g = self.context.expanded_coeffs(h.shape[0], self.rank)  # (batch, n*r)
        return g.view(h.shape[0], *([1] * (h.dim() - 2)), n * self.rank)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, "
                f"scale={self.scale:g}, branches={self.num_branches}, stream={self.stream}")
