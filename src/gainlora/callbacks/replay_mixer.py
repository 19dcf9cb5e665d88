"""Hands a replay buffer's examples to the datamodule for one fit and the datamodule to the buffer's
owner (``methods.replay``; ``methods.sapt``, which mixes nothing in and reads the buffer itself)."""
from __future__ import annotations

from typing import Protocol

import lightning as L

from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.types import Example


class ReplaySource(Protocol):
    datamodule: TaskStreamDataModule | None

    def replay_examples(self, datamodule: TaskStreamDataModule) -> list[Example]: ...


class ReplayMixer(L.Callback):
    """Sets the fit's replay examples on the datamodule before its train loader is built (Lightning
    calls ``setup`` first) and clears them when the fit ends, so tests, feature collection and the
    next task start from the task's own data."""

    def __init__(self, source: ReplaySource) -> None:
        self.source = source

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            datamodule = trainer.datamodule
            self.source.datamodule = datamodule
            datamodule.set_replay(self.source.replay_examples(datamodule))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            trainer.datamodule.set_replay([])
