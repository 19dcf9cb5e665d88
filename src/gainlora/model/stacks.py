"""Frozen stacks plus one trainable slot: how branches and gates are held.

A LoRA layer and the gate bank both keep every finished task's tensors in buffers (never seen by an
optimizer, saved with the module) and the current task's as Parameters. Freezing appends the
current tensors to their buffers bit for bit; the stacked view (frozen, then current) is what the
batched forward uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Slot:
    """A trainable attribute ``param`` and the buffer ``frozen`` its finished values are stacked in.

    ``dim`` is the stacking dimension. With ``block`` set, each task adds ``block`` consecutive rows
    (or columns) along ``dim`` (LoRA: r rows of A, r columns of B); with ``block=None`` each task adds
    one new index along ``dim`` (a gate's matrices).
    """

    param: str
    frozen: str
    dim: int = 0
    block: int | None = None


class FrozenStack(nn.Module):
    """Base for modules made of ``slots``: one entry per task, the last one trainable until frozen."""

    slots: tuple[Slot, ...] = ()

    def init_stacks(self, empty: dict[str, Tensor]) -> None:
        """Register each slot's empty frozen buffer (``empty[slot.frozen]``) and an empty current slot."""
        for slot in self.slots:
            self.register_buffer(slot.frozen, empty[slot.frozen])
        for slot in self.slots:
            setattr(self, slot.param, None)  # a Parameter while an entry is open

    @property
    def num_frozen(self) -> int:
        first = self.slots[0]
        size = getattr(self, first.frozen).shape[first.dim]
        return size // first.block if first.block else size

    @property
    def has_current(self) -> bool:
        return getattr(self, self.slots[0].param) is not None

    @property
    def num_entries(self) -> int:
        return self.num_frozen + self.has_current

    def open_current(self, values: dict[str, Tensor]) -> None:
        """Freeze the current entry (if any) and make ``values`` (param name -> tensor) the new one,
        as float32 Parameters on the buffers' device."""
        self.freeze_current()
        device = getattr(self, self.slots[0].frozen).device
        for slot in self.slots:
            value = values[slot.param].detach().to(device, torch.float32).clone()
            setattr(self, slot.param, nn.Parameter(value))

    def freeze_current(self) -> None:
        """Append the current entry to the frozen stacks (a bit-exact copy) and empty the slot."""
        if not self.has_current:
            return
        for slot in self.slots:
            setattr(self, slot.frozen, torch.cat([getattr(self, slot.frozen), self._piece(slot).detach()],
                                                 slot.dim))
        self.discard_current()

    def discard_current(self) -> None:
        for slot in self.slots:
            setattr(self, slot.param, None)

    def entry(self, i: int) -> dict[str, Tensor]:
        """Entry ``i`` (0-based, task order), frozen or current, by param name."""
        if i < self.num_frozen:
            out = {}
            for slot in self.slots:
                frozen = getattr(self, slot.frozen)
                out[slot.param] = (frozen.narrow(slot.dim, i * slot.block, slot.block) if slot.block
                                   else frozen.select(slot.dim, i))
            return out
        if i == self.num_frozen and self.has_current:
            return {slot.param: getattr(self, slot.param) for slot in self.slots}
        raise IndexError(f"entry {i} of {self.num_entries}")

    def stacked(self) -> tuple[Tensor, ...]:
        """Every slot's frozen entries followed by the current one (autograd flows to the current)."""
        if not self.has_current:
            return tuple(getattr(self, slot.frozen) for slot in self.slots)
        if self.num_frozen == 0:
            return tuple(self._piece(slot) for slot in self.slots)
        return tuple(torch.cat([getattr(self, slot.frozen), self._piece(slot)], slot.dim) for slot in self.slots)

    def _piece(self, slot: Slot) -> Tensor:
        value = getattr(self, slot.param)
        return value if slot.block else value.unsqueeze(slot.dim)
