"""The update constraint: keep every gate parameter's change orthogonal to the old tasks' inputs.

After each optimizer step, Delta = P_new - P_old is replaced by Delta - Delta M M^T for each gate
parameter (G1 with M1, G2 with M2, the key with M3; a deeper gate's every layer with the memory of
its input). Projecting the parameter change (not the
gradient) keeps the constraint exact under stateful optimizers such as AdamW. Under DeepSpeed ZeRO
the change is read from and written to the optimizer's fp32 master copy (docs/architecture.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from gainlora.memory import Subspace


def _zero_managed(param: torch.nn.Parameter) -> bool:
    """Is the master copy of ``param`` held by a DeepSpeed ZeRO optimizer (stage 1-3)?"""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def read_full(param: torch.nn.Parameter) -> torch.Tensor:
    """The parameter's full fp32 value. Under ZeRO that is the optimizer's master copy, which the
    module's own (possibly bf16) tensor only mirrors; reading it is a collective: all ranks call."""
    if _zero_managed(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().clone()
    return param.detach().float().clone()


def write_full(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the parameter everywhere it lives: ZeRO's master copy (else the next step would undo the
    edit from the stale master) and the module's tensor used by the forward."""
    if _zero_managed(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)
    if hasattr(param, "ds_id"):  # ZeRO-3: the module holds a shard; gather, write, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype))
    else:
        param.data.copy_(value.to(param.dtype))


class GateProjection(L.Callback):
    def __init__(self, memories: Sequence[Subspace], *, renorm_rows: bool = False) -> None:
        self.memories = memories
        self.renorm_rows = renorm_rows
        self._before: dict[str, torch.Tensor] = {}

    def _params(self, pl_module) -> dict[str, torch.nn.Parameter]:
        gates = pl_module.gates
        if gates is None or gates.G1 is None:
            return {}
        return {name: getattr(gates, name) for name in gates.param_names}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if any(m.rank for m in self.memories):
            self._before = {n: read_full(p) for n, p in self._params(pl_module).items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._before:
            return
        for (name, param), memory in zip(self._params(pl_module).items(), self.memories, strict=True):
            old = self._before[name]
            new = read_full(param)
            delta = (new - old).reshape(-1, memory.dim)  # the key is one row
            projected = old + memory.project_out_rows(delta).view_as(old)
            if self.renorm_rows:
                # Reference-code behaviour: restore each row's unprojected norm. This moves G p
                # for old inputs, so it breaks the exact invariance (off by default).
                rows_new = new.reshape(-1, memory.dim).norm(dim=1, keepdim=True)
                rows = projected.reshape(-1, memory.dim)
                projected = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * rows_new).view_as(old)
            write_full(param, projected)
        self._before = {}
