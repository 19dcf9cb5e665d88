"""GainLoRA's gating modules (docs/method.md, "Gate g_i").

Gate i maps the pooled input embeddings p0(x) of an example to one coefficient a_i(x):
p1 = SiLU(G1 p0), p2 = SiLU(G2 p1), b = 4 cos(p2, k_i), a_i = |2 sigmoid(b) - 1| (the paper's gate,
``depth=1``: one hidden layer of width ``hidden``). ``depth`` L > 1 stacks L hidden layers
(G1: h x d, G2..GL: h x h, G(L+1): d x h), each layer's input having its own memory, so the
orthogonality argument holds layer by layer. ``output`` picks f in a_i = f(cos): the paper's, |cos|
(both 0 at cos = 0, which the constraints need) or sigmoid(4 cos), which gives 1/2 there: the
appendix's counter-example, whose new gate is *not* silent on old tasks.
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
Output = Literal["abs_2sigmoid", "abs_cos", "sigmoid"]
OUTPUTS: tuple[str, ...] = get_args(Output)


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
    """Every task's gate. ``forward(p0)`` returns coefficients (B, num_gates), task order.

    Parameters of one gate, in order: the layers ``G1 .. G(depth+1)``, then ``key``; the memory of
    parameter j spans its input (p0 for G1, p_j for Gj+1, p(depth+1) for the key)."""

    def __init__(self, dim: int, hidden: int = 100, depth: int = 1, output: Output = "abs_2sigmoid",
                 key_scale: float = 4.0) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown gate output {output!r}; expected one of {OUTPUTS}")
        self.dim, self.hidden, self.depth, self.output, self.key_scale = dim, hidden, depth, output, key_scale
        self.layers = tuple(f"G{i + 1}" for i in range(depth + 1))
        self.param_names = (*self.layers, "key")
        # one instance attribute per bank: the depth decides the slots (depth 1: G1, G2, key as before)
        self.slots = (*(Slot(n, f"frozen_{n}") for n in self.layers), Slot("key", "frozen_keys"))
        self.init_stacks({f"frozen_{n}": torch.zeros(0, *shape) for n, shape in self.layer_shapes().items()}
                         | {"frozen_keys": torch.zeros(0, dim)})

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every layer: d -> h -> ... -> h -> d."""
        widths = [self.dim, *[self.hidden] * self.depth, self.dim]
        return {n: (widths[i + 1], widths[i]) for i, n in enumerate(self.layers)}

    def entry_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter of one gate (layers, then the key), checked on restore."""
        return {**self.layer_shapes(), "key": (self.dim,)}

    def input_dims(self) -> tuple[int, ...]:
        """Dimension of each parameter's input space, i.e. of its memory (param_names order)."""
        return tuple(shape[1] for shape in self.layer_shapes().values()) + (self.dim,)

    def flops_per_example(self) -> int:
        """Forward matmul FLOPs of every gate's MLP for one example (gainlora.cost)."""
        return self.num_gates * sum(2 * out * inp for out, inp in self.layer_shapes().values())

    @property
    def num_gates(self) -> int:
        return self.num_entries

    def add_gate(self, *, copy_previous: bool, generator: torch.Generator | None = None,
                 **values: Tensor | None) -> None:
        """Freeze the current gate and open a new one; ``values`` may give any parameter (G1, ..., key).

        With ``copy_previous`` (the initialization constraint) the layers start as the previous gate's;
        otherwise they are drawn like ``nn.Linear`` weights, G1 first. The key starts U(-1, 1); the
        initialization constraint later replaces it (see methods.gainlora).
        """
        unknown = set(values) - set(self.param_names)
        if unknown:
            raise ValueError(f"not a gate parameter: {sorted(unknown)}; this bank has {self.param_names}")
        self.freeze_current()
        layers = {n: values.get(n) for n in self.layers}
        if any(v is None for v in layers.values()):
            if copy_previous and self.num_frozen:
                layers = {n: getattr(self, f"frozen_{n}")[-1] for n in self.layers}
            else:
                layers = {n: _linear_init(*shape, generator) for n, shape in self.layer_shapes().items()}
        key = values.get("key")
        if key is None:
            key = torch.rand(self.dim, generator=generator) * 2 - 1
        self.open_current({**layers, "key": key})

    def gate(self, i: int) -> dict[str, Tensor]:
        """The parameters (G1, ..., key) of gate i (0-based), frozen or current."""
        return self.entry(i)

    def features(self, p0: Tensor) -> tuple[Tensor, ...]:
        """p1 .. p(depth+1) of every gate, each (B, n, width): the inputs of G2 .. and of the key."""
        *weights, _ = self.stacked()
        x = p0.to(weights[0].dtype)
        x = F.silu(torch.einsum("bd,nhd->bnh", x, weights[0]))
        out = [x]
        for w in weights[1:]:
            x = F.silu(torch.einsum("bni,noi->bno", x, w))
            out.append(x)
        return tuple(out)

    def forward(self, p0: Tensor) -> Tensor:
        last = self.features(p0)[-1]
        keys = self.stacked()[-1]
        cos = F.cosine_similarity(last, keys[None], dim=-1, eps=1e-12)
        if self.output == "abs_cos":
            return cos.abs()
        if self.output == "sigmoid":
            return torch.sigmoid(self.key_scale * cos)
        # |2 sigmoid(b) - 1| == |tanh(b / 2)|, and tanh keeps full precision near b = 0.
        return torch.tanh(self.key_scale * cos / 2).abs()


def _linear_init(out_features: int, in_features: int, generator: torch.Generator | None) -> Tensor:
    bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default (kaiming-uniform with a=sqrt(5))
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
