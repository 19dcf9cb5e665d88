"""MIGU (Du et al., 2024, "Unlocking Continual Learning Abilities in Language Models") with LoRA:
one branch trained through every task (SeqLoRA), whose gradient updates are restricted, from the
second task on, to the output units with the largest L1 output magnitudes on the current step's
inputs (``callbacks.magnitude_mask``). The reference code masks only after the first task
(``is_first_task``): the first task trains unmasked.
"""
from __future__ import annotations

from typing import Annotated

from lightning import Callback
from pydantic import Field

from gainlora.callbacks.magnitude_mask import MagnitudeMask
from gainlora.methods.base import Batches, SeqLoRA
from gainlora.model.module import ContinualLM


class MIGU(SeqLoRA):
    name = "migu"

    def __init__(self, quantile: Annotated[float, Field(ge=0, lt=1)] = 0.3, combined: bool = True,
                 max_batches: Annotated[int | None, Field(ge=1)] = 100) -> None:
        super().__init__(max_batches=max_batches)
        self.quantile, self.combined = quantile, combined
        self.task = 0

    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_start(model, task, batches)
        self.task = task

    def callbacks(self) -> list[Callback]:
        found = super().callbacks()
        if self.task > 0:
            found.append(MagnitudeMask(self.quantile, combined=self.combined))
        return found
