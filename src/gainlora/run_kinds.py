"""What results.json's matrix means, by the kind of run (``Method.run_kind``): its metrics, its plots,
its note and its curves in ``make report``. One object per kind instead of ``if kind == ...`` in the
loop, the report and the W&B logging.

- ``continual``: R[t][j] after each task; AP/FT/BWT/FWT (:func:`gainlora.metrics.cl_metrics`).
- ``single_task``: every task learned by a fresh branch from the plain backbone; only the diagonal
  (S, for other runs' FWT) is meaningful.
- ``multi_task``: one joint fit on every task; a single row that scores every task.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gainlora.metrics import average_curve, cl_metrics, joint_row, lower_triangle

Matrix = Sequence[Sequence[float | None]]
NOT_APPLICABLE = ("FT", "BWT", "BWT_ref", "FWT")
METRIC_KEYS = ("AP", "FT", "BWT", "BWT_ref", "FWT", "FWT_diag")


class RunKind:
    name = "continual"
    note: str | None = None
    joint = False  # one fit on every task: the matrix is one row scoring every task
    forgetting = True  # a task's later scores measure forgetting (curves, FT, BWT)

    def metrics(self, matrix: Matrix, single_task: Sequence[float] | None = None) -> dict[str, float | None]:
        return cl_metrics(matrix, single_task)

    def check(self, matrix: Matrix, tasks: Sequence[str]) -> None:
        """ValueError unless ``matrix`` is a valid (possibly partial) matrix of this kind over ``tasks``."""
        if len(tasks) < len(lower_triangle(matrix)):
            raise ValueError(f"{len(matrix)} matrix rows but only {len(tasks)} task names")

    def plot(self, matrix: Matrix, tasks: Sequence[str], plots_dir: Path, title: str = "",
             metric: str = "score") -> list[Path]:
        """``matrix.png`` and ``forgetting.png``."""
        from gainlora.plots import plot_forgetting, plot_matrix  # matplotlib: only when plotting

        rows = lower_triangle(matrix)
        names = list(tasks[: len(rows)])
        return [plot_matrix(rows, names, plots_dir / "matrix.png", title=title or None, metric=metric),
                plot_forgetting(rows, names, plots_dir / "forgetting.png", title=title or None, metric=metric)]

    def curves(self, matrix: Matrix) -> tuple[list[int], list[float], list[float], str]:
        """(tasks learned, average of seen tasks, score of the first task, line style) for compare.png."""
        rows = lower_triangle(matrix)
        return list(range(1, len(rows) + 1)), average_curve(rows), [row[0] for row in rows], "-"


class SingleTaskKind(RunKind):
    name = "single_task"
    note = ("single-task reference run: every task is learned by a fresh LoRA branch from the plain backbone, "
            "with no earlier branch active. Only the diagonal R[j][j] is meaningful: it is S[j], the "
            "single-task score that other runs' FWT is measured against (metrics.single_task_run). "
            "Off-diagonal entries score task j with a later task's branch. AP here is the mean of the "
            "diagonal (each task scored by its own branch); FT, BWT and FWT do not apply (null).")
    forgetting = False

    def metrics(self, matrix: Matrix, single_task: Sequence[float] | None = None) -> dict[str, float | None]:
        rows = lower_triangle(matrix)
        mean = sum(rows[j][j] for j in range(len(rows))) / len(rows)
        return {"AP": mean, **dict.fromkeys(NOT_APPLICABLE), "FWT_diag": mean}

    def plot(self, matrix: Matrix, tasks: Sequence[str], plots_dir: Path, title: str = "",
             metric: str = "score") -> list[Path]:
        """``matrix.png`` only: its off-diagonal entries are no forgetting."""
        from gainlora.plots import plot_matrix

        rows = lower_triangle(matrix)
        return [plot_matrix(rows, list(tasks[: len(rows)]), plots_dir / "matrix.png",
                            title=f"{title}\nonly the diagonal is meaningful", metric=metric)]

    def curves(self, matrix: Matrix) -> tuple[list[int], list[float], list[float], str]:
        rows = lower_triangle(matrix)
        diag = [rows[j][j] for j in range(len(rows))]
        steps = list(range(1, len(rows) + 1))
        return steps, [sum(diag[: t + 1]) / (t + 1) for t in range(len(diag))], [diag[0]] * len(diag), ":"


class MultiTaskKind(RunKind):
    name = "multi_task"
    note = ("multi-task reference run (the upper bound): one LoRA branch trained jointly on the union of "
            "every task's training data in one fit, then tested on every task. The matrix has a single row, "
            "the score on each task; AP is its mean; FT, BWT and FWT do not apply (null).")
    joint = True
    forgetting = False

    def metrics(self, matrix: Matrix, single_task: Sequence[float] | None = None) -> dict[str, float | None]:
        row = joint_row(matrix)
        return {"AP": sum(row) / len(row), **dict.fromkeys(NOT_APPLICABLE), "FWT_diag": None}

    def check(self, matrix: Matrix, tasks: Sequence[str]) -> None:
        if len(joint_row(matrix)) != len(tasks):
            raise ValueError(f"one score per task expected, {len(tasks)} tasks")

    def plot(self, matrix: Matrix, tasks: Sequence[str], plots_dir: Path, title: str = "",
             metric: str = "score") -> list[Path]:
        """``scores.png``: one score per task."""
        from gainlora.plots import plot_task_scores

        return [plot_task_scores(joint_row(matrix), tasks, plots_dir / "scores.png",
                                 title=f"{title}\njoint training on all tasks", metric=metric)]

    def curves(self, matrix: Matrix) -> tuple[list[int], list[float], list[float], str]:
        """Flat dashed lines: every task was learned at once (the upper bound)."""
        row = joint_row(matrix)
        return list(range(1, len(row) + 1)), [sum(row) / len(row)] * len(row), [row[0]] * len(row), "--"


RUN_KINDS: dict[str, RunKind] = {kind.name: kind for kind in (RunKind(), SingleTaskKind(), MultiTaskKind())}


def run_kind(name: str | None) -> RunKind:
    """The kind named ``name``; None (results written before run kinds existed) is continual."""
    try:
        return RUN_KINDS[name or "continual"]
    except KeyError:
        raise ValueError(f"unknown run kind {name!r}; expected one of {sorted(RUN_KINDS)}") from None
