"""Forgetting metrics as a Lightning callback: the accuracy matrix R[t][j], one row recorded when
each task's test ends, and the run kind's metrics over it (AP, FT, BWT, FWT). One instance is kept
across the per-task Trainers; the loop's observers read it."""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from gainlora.run_kinds import METRIC_KEYS, RunKind


class ForgettingMetrics(L.Callback):
    def __init__(self, num_tasks: int, kind: RunKind, single_task: Sequence[float] | None = None) -> None:
        self.num_tasks = num_tasks
        self.kind = kind
        self.single_task = single_task  # S[j] from a single-task reference run: FWT
        self.matrix: list[list[float | None]] = []  # row t padded with None for tasks not yet learned

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self.record(pl_module.current_task, pl_module.test_scores())

    def record(self, task: int, scores: Sequence[float]) -> list[float]:
        """Add the row of scores on tasks 0..task after learning ``task``; returns it (4 decimals)."""
        row = [round(float(s), 4) for s in scores]
        self.matrix.append(row + [None] * (self.num_tasks - task - 1))
        return row

    def metrics(self) -> dict[str, float | None]:
        if not self.matrix:
            return dict.fromkeys(METRIC_KEYS)
        return self.kind.metrics(self.matrix, self.single_task)
