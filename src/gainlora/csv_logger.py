"""A CSV logger that appends to the run's metrics.csv across Trainers and resumptions.

Lightning's CSVLogger deletes an existing metrics.csv when its writer starts, which would wipe the
per-step history of finished tasks whenever an interrupted sequence is resumed.
"""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # keep the old rows: continue with their header
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` directly in the run directory, never truncated."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
