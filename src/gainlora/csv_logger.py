"""A CSV logger that keeps the run's metrics.csv across Trainers and resumptions, never truncated.

Lightning's CSVLogger deletes an existing metrics.csv when its writer starts, which would wipe the
per-step history of finished tasks whenever an interrupted sequence is resumed, and rewrites the
whole file in place when a new key appears: a kill during that rewrite left it empty. Here every
save writes the old rows and the new ones to a temporary file that replaces metrics.csv.

Every row also carries ``task`` (1-based, as in the log lines and task folders) and ``global_step``,
counted across the whole sequence: Lightning's ``step`` restarts with each task's Trainer.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from gainlora.artifacts import ArtifactError, atomic_write


def read_rows(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows (none when it does not exist); ``ArtifactError`` naming it when it is not a
    CSV file that can be read and appended to (a folder, binary garbage)."""
    if not path.exists():
        return []
    if not (path.is_file() or path.is_dir()):  # a FIFO would block the read for ever; a folder is named below
        raise ArtifactError(f"{path}: not a readable metrics file (not a regular file); move it away to continue "
                            "(the finished tasks' rows are written again)")
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        if any(None in row for row in rows):  # more fields than the header: rewriting it would fail mid-run
            raise csv.Error(f"line {next(i for i, r in enumerate(rows, 2) if None in r)} is longer than the header")
        return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise ArtifactError(f"{path}: not a readable metrics file ({reason}); move it away to continue (the finished "
                            "tasks' rows are written again)") from None


def logged_tasks(path: Path) -> set[int]:
    """The tasks whose CL metrics row (cl/task) metrics.csv holds."""
    return {int(float(row["cl/task"])) for row in read_rows(path) if row.get("cl/task")}


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # keep the old rows: continue with their header
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        old = read_rows(Path(self.metrics_file_path))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(old)
                writer.writerows(self.metrics)

        atomic_write(Path(self.metrics_file_path), write)
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` directly in the run directory, never truncated."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self.task: int | None = None  # 0-based index of the task being trained
        self.step_offset = 0  # optimizer steps of the tasks before it

    def start_task(self, task: int, step_offset: int) -> None:
        self.task, self.step_offset = task, step_offset

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.task is not None and "task" not in metrics:
            metrics = {**metrics, "task": self.task + 1, "global_step": self.step_offset + (step or 0)}
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
