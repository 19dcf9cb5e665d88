"""MIGU's gradient mask (Du et al., 2024): keep the gradient only of output units whose L1 output
magnitude over the optimizer step's tokens is above a quantile of the layer's units.

For a LoRA branch y = W h + s B (A h) there are two sets of output units:
- A's rows (r units): magnitude sum_tokens |A h|;
- B's rows (d_out units): magnitude sum_tokens |y| of the whole adapted layer (the reference code's
  ``activation_combined=True``) or of the branch output s B A h (``combined=False``).
A row of A (B) whose unit is below ``torch.quantile(magnitudes, quantile)`` gets zero gradient, as
in the reference (``importance = magnitude > quantile``). Magnitudes are summed over every
micro-batch of an optimizer step (gradient accumulation) and over all ranks, and reset after it.

Where the mask is applied: a hook on each masked Parameter's gradient (``Tensor.register_hook``),
which autograd calls on the whole gradient before it is accumulated into ``.grad``, hence before
DDP's reduction and DeepSpeed ZeRO-2/3's reduce-and-partition hooks (they run after accumulation).
A mask applied to ``.grad`` afterwards would miss ZeRO's partitioned gradients. The step's mask is
known only once its last micro-batch has run forward, so the hooks hold earlier micro-batches'
gradients back (zero goes on) and release their sum, masked, with the last one: the mask is linear,
so this is the masked accumulated gradient. Masks are computed before that backward from magnitudes
all-reduced over the ranks (one collective, outside autograd), so every rank masks alike and N
processes give the one-process step.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from gainlora.dist import all_reduce_flat, distributed, last_micro_batch
from gainlora.model.lora import GatedLoRALinear


def magnitude_mask(magnitudes: Tensor, quantile: float) -> Tensor:
    """1.0 for units strictly above the ``quantile`` of ``magnitudes`` (1-d), else 0.0."""
    return (magnitudes > torch.quantile(magnitudes.float(), quantile)).to(magnitudes.dtype)


class MagnitudeMask(L.Callback):
    def __init__(self, quantile: float, *, combined: bool = True) -> None:
        self.quantile, self.combined = quantile, combined
        self.sums: dict[str, list[Tensor]] = {}  # layer name -> [A units, B units] of the step so far
        self.masks: dict[str, list[Tensor]] | None = None  # set for the backward that ends a step
        self.held: dict[tuple[str, int], Tensor] = {}  # gradients of the step's earlier micro-batches
        self._handles: list = []

    def _record(self, name: str, layer: GatedLoRALinear, inputs: tuple, output: Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled()) or layer.lora_A is None:
            return  # validation, generation, feature collection
        with torch.no_grad():
            h = inputs[0].reshape(-1, layer.in_features).float()
            z = h @ layer.lora_A.T
            y = output.reshape(-1, layer.out_features).float() if self.combined \
                else layer.scale * z @ layer.lora_B.T
            a, b = z.abs().sum(0), y.abs().sum(0)
        if name in self.sums:
            self.sums[name][0] += a
            self.sums[name][1] += b
        else:
            self.sums[name] = [a, b]

    def _mask_gradient(self, name: str, unit: int, grad: Tensor) -> Tensor:
        held = self.held.pop((name, unit), None)
        total = grad if held is None else held + grad
        if self.masks is None:  # an earlier micro-batch of the step: its mask is not known yet
            self.held[name, unit] = total
            return torch.zeros_like(grad)
        if name not in self.masks:
            return total
        return total * self.masks[name][unit].to(grad.dtype)[:, None]

    def on_train_start(self, trainer, pl_module) -> None:
        for name, layer in pl_module.adapted.items():
            # prepend: before ZeRO-3's post-forward hook releases the gathered lora_A / lora_B
            record = lambda mod, inp, out, name=name: self._record(name, mod, inp, out)  # noqa: E731
            self._handles.append(layer.register_forward_hook(record, prepend=True))
            for unit, param in enumerate((layer.lora_A, layer.lora_B)):
                if param is not None and param.requires_grad:
                    mask = lambda grad, name=name, unit=unit: self._mask_gradient(name, unit, grad)  # noqa: E731
                    self._handles.append(param.register_hook(mask))

    @torch.no_grad()
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not last_micro_batch(trainer):
            self.masks = None
            return
        names = sorted(self.sums)  # every rank ran the same layers
        if distributed() and names:
            parts = iter(all_reduce_flat([s for name in names for s in self.sums[name]]))
            self.sums = {name: [next(parts), next(parts)] for name in names}
        self.masks = {name: [magnitude_mask(s, self.quantile) for s in self.sums[name]] for name in names}
        self.sums = {}

    def on_after_backward(self, trainer, pl_module) -> None:
        self.masks = None  # the step's gradients are out; the next step's masks come from its own magnitudes

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.sums, self.masks, self.held = [], {}, None, {}
