"""Per-element importance of the branch being trained, as TaSL (and AdaLoRA before it) estimates it:
once per optimizer step, sensitivity I = |theta * grad|, smoothed I_bar <- b1 I_bar + (1 - b1) I, and
its uncertainty U_bar <- b2 U_bar + (1 - b2) |I - I_bar|; a matrix's importance is mean(I_bar U_bar).

``grad`` is the step's whole gradient (its micro-batches summed, averaged over the ranks as DDP
does), read by a hook on each tracked Parameter (``Tensor.register_hook``) while autograd computes
it: DeepSpeed ZeRO-2/3 move gradients into partitioned buffers and leave ``.grad`` empty, and
under FSDP the replicated gradients are averaged only before the optimizer step. ``theta`` is
taken in the same hook, where a ZeRO-3 partitioned Parameter is still gathered. With fp16 loss
scaling the hooked gradient is the scaled one: it is divided by the step's scale, and a step whose
gradient overflowed (the scaler skips that optimizer step) is left out of the averages.
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from gainlora.dist import all_reduce_flat, distributed, last_micro_batch


def loss_scale(trainer) -> float:
    """What fp16 training multiplied this backward's loss by (1.0 without a scaler): Lightning's
    GradScaler (plain or FSDP), or the fp16 optimizer's under DeepSpeed."""
    if trainer is None:
        return 1.0
    plugin = trainer.precision_plugin
    if isinstance(plugin, (MixedPrecision, FSDPPrecision)) and plugin.scaler is not None:
        return float(plugin.scaler.get_scale())
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.deepspeed_engine.fp16_enabled():
        return float(trainer.strategy.deepspeed_engine.optimizer.cur_scale)
    return 1.0


class ImportanceTracker(L.Callback):
    def __init__(self, beta1: float, beta2: float, params: Callable[[L.LightningModule], dict[str, Tensor]]) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.params = params  # the tracked tensors of a module, by name
        self.avg_ipt: dict[str, Tensor] = {}
        self.avg_unc: dict[str, Tensor] = {}
        self._step: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (theta, gradient so far) of this step
        self._handles: list = []

    @staticmethod
    def sensitivity(param: Tensor, grad: Tensor) -> Tensor:
        """First-order estimate of the loss change from removing each element: |theta * grad|."""
        return (param * grad).abs()

    @torch.no_grad()
    def update(self, found: dict[str, tuple[Tensor, Tensor]]) -> None:
        """One step's (theta, gradient) per tracked tensor."""
        for key, (param, grad) in found.items():
            ipt = self.sensitivity(param.float(), grad.float())
            if key not in self.avg_ipt:
                self.avg_ipt[key], self.avg_unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
            self.avg_ipt[key].mul_(self.beta1).add_((1 - self.beta1) * ipt)
            self.avg_unc[key].mul_(self.beta2).add_((1 - self.beta2) * (ipt - self.avg_ipt[key]).abs())

    @torch.no_grad()
    def _record(self, key: str, param: Tensor, grad: Tensor) -> None:
        held = self._step.get(key)
        self._step[key] = (param.detach().clone(), grad.detach().float() + (0 if held is None else held[1]))

    def on_train_start(self, trainer, pl_module) -> None:
        for key, param in self.params(pl_module).items():
            if param is not None and param.requires_grad:
                hook = lambda grad, key=key, param=param: self._record(key, param, grad)  # noqa: E731
                self._handles.append(param.register_hook(hook))

    @torch.no_grad()
    def on_after_backward(self, trainer, pl_module) -> None:
        if not last_micro_batch(trainer):
            return
        step, self._step = self._step, {}
        keys = sorted(step)  # every rank's backward reached the same tensors
        grads = [step[k][1] for k in keys]
        if distributed() and keys:
            grads = all_reduce_flat(grads, mean=True)
        if not all(torch.isfinite(g).all() for g in grads):
            return  # an fp16 overflow: the scaler skips this step, and so do the averages
        scale = loss_scale(trainer)
        self.update({k: (step[k][0], g / scale) for k, g in zip(keys, grads)})

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._step = [], {}

    # In-task checkpoints keep the averages, so a task resumed mid-way ranks its units as if uninterrupted.
    def state_dict(self) -> dict:
        return {"avg_ipt": dict(self.avg_ipt), "avg_unc": dict(self.avg_unc)}

    def load_state_dict(self, state: dict) -> None:
        self.avg_ipt, self.avg_unc = dict(state["avg_ipt"]), dict(state["avg_unc"])

    def scores(self, params: dict[str, Tensor]) -> dict[str, float]:
        """mean(I_bar * U_bar) per matrix; 0 for one that never had a gradient."""
        return {k: (self.avg_ipt[k] * self.avg_unc[k]).mean().item() if k in self.avg_ipt else 0.0 for k in params}
