"""What happens when a task ends: observers created once per run and kept across the per-task
Trainers (the loop calls them; Lightning knows nothing of tasks).

- :class:`ResultsWriter`: predictions.json, results.json and the plots of the run's kind;
- :class:`LoggerMetrics`: the CL metrics to the Lightning loggers (metrics.csv, TensorBoard ...)
  against the task index;
- :class:`WandbMetrics`: the same to W&B with tables and plots (``wandb_logging``).

A task restored on resume is announced again with ``restored=True``, after every finished task
has been verified: an observer fills in what a kill between the task's DONE marker and its own
output left missing (predictions.json, the task's metrics.csv row), and never repeats the rest.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

from gainlora import cost
from gainlora.artifacts import RunDir, atomic_write, write_json
from gainlora.csv_logger import RunCSVLogger, logged_tasks
from gainlora.run_kinds import run_kind
from gainlora.wandb_logging import log_task_end

PREDICTIONS = "predictions.json"  # in the run directory (the latest test) and in each task folder


@dataclass(frozen=True)
class TaskEnd:
    task: int  # index of the task just learned (a joint fit: the last task)
    folder: Path  # its finished task folder
    results: dict  # results.json's content at this point (status "running")
    restored: bool = False  # finished in an earlier attempt, announced again on resume
    global_step: int | None = None  # optimizer steps of the sequence up to the end of this task


class TaskObserver:
    def on_task_start(self, task: int, global_step: int) -> None:
        """Task ``task`` is about to train; ``global_step``: optimizer steps of the tasks before it."""

    def on_task_end(self, end: TaskEnd) -> None:
        """A task is finished and its folder written (DONE included)."""

    def on_run_end(self, results: dict) -> None:
        """The run finished, failed or was interrupted (results["status"])."""


class ResultsWriter(TaskObserver):
    def __init__(self, run_dir: RunDir, *, is_main: bool = True, module=None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main  # global rank 0 writes the run directory
        self.module = module  # the ContinualLM, for results.json's ``cost`` (gainlora.cost); None: no cost
        self.trainable: dict[str, int | None] = {}

    def on_task_end(self, end: TaskEnd) -> None:
        if not self.is_main:
            return
        self.count_trainable(end)
        source = end.folder / PREDICTIONS
        if source.is_file():  # the run's predictions.json: those of the latest test
            atomic_write(self.run_dir.predictions, lambda tmp: shutil.copyfile(source, tmp))
        if not end.restored:  # results.json waits until every finished task is restored
            self.write(end.results)

    def on_run_end(self, results: dict) -> None:
        if self.is_main:
            self.write(results)

    def count_trainable(self, end: TaskEnd) -> None:
        """The task's branch and gate are still open (they freeze when the next task opens its own);
        a restored task's count comes from the results.json of the attempt that trained it."""
        if self.module is None:
            return
        name = end.results["tasks"][end.task]
        if not end.restored:
            self.trainable[name] = cost.trainable_params(self.module)
        elif self.run_dir.results.is_file():
            # rewritten from the verified tasks below; an unreadable one only loses this count
            earlier = self.run_dir.saved("cost") or {}
            self.trainable[name] = earlier.get("trainable_params_per_task", {}).get(name)

    def write(self, results: dict) -> None:
        if self.module is not None:  # in place: the later observers and the loop's return value see it too
            results["cost"] = cost.figures(self.module, dict(self.trainable))
        write_json(self.run_dir.results, results)
        if results["matrix"]:
            run_kind(results["run_kind"]).plot(results["matrix"], results["tasks"], self.run_dir.plots,
                                               title=plot_title(results), metric=results.get("metric") or "score")


def plot_title(results: dict) -> str:
    """``demo · gainlora_inflora`` and, below, the metrics that apply: ``AP 98.25 · FT 1.17 · BWT -1.17``."""
    scores = " · ".join(f"{k} {results[k]:.2f}" for k in ("AP", "FT", "BWT", "FWT")
                        if isinstance(results.get(k), (int, float)))
    return f"{results.get('experiment')} · {results.get('method')}" + (f"\n{scores}" if scores else "")


def task_metrics(task: int, results: dict) -> dict[str, float]:
    """cl/task, cl/AP, cl/FT, cl/BWT and each seen task's score, after task ``task``."""
    kind = run_kind(results["run_kind"])
    rows = results["matrix"][: 1 if kind.joint else task + 1]  # a restored task may not be the last row
    row, scores = rows[-1], kind.metrics(rows)
    return {"cl/task": task + 1, **{f"cl/{k}": scores[k] for k in ("AP", "FT", "BWT") if scores[k] is not None},
            **{f"cl/score/{name}": row[j] for j, name in enumerate(results["tasks"][: task + 1])}}


class LoggerMetrics(TaskObserver):
    """CL metrics after each task to every Lightning logger but W&B, against the task index (the
    per-task Trainers' global steps restart at every task)."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = [lg for lg in loggers if not isinstance(lg, WandbLogger)]

    def on_task_start(self, task: int, global_step: int) -> None:
        for logger in self.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.start_task(task, global_step)

    def on_task_end(self, end: TaskEnd) -> None:
        for logger in self.loggers:
            csv_logger = isinstance(logger, RunCSVLogger)
            if end.restored and not (csv_logger and end.task + 1 not in
                                     logged_tasks(Path(logger.log_dir) / "metrics.csv")):
                continue  # logged before the kill (only metrics.csv can be checked)
            metrics = task_metrics(end.task, end.results)
            if csv_logger:
                metrics |= {"task": end.task + 1, "global_step": end.global_step}
            logger.log_metrics(metrics, step=end.task)
            logger.save()


class WandbMetrics(TaskObserver):
    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]

    def on_task_end(self, end: TaskEnd) -> None:
        if self.loggers and not end.restored:  # the resumed W&B run already holds restored tasks
            log_task_end(self.loggers, end.task, end.results)


def logger_observers(loggers: list[Logger]) -> list[TaskObserver]:
    """The observers of a run's Lightning loggers (the loop adds its ResultsWriter itself)."""
    return [LoggerMetrics(loggers), WandbMetrics(loggers)]
