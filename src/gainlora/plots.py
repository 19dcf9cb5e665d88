"""Figures of one run: the score matrix heatmap, the forgetting curves, a multi-task run's bars.

Figures are bare ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot): nothing global is
switched, no display is needed, and callbacks can plot from any thread. ``*_figure`` builds the
figure (tests read it), ``plot_*`` writes it as a PNG atomically. Sizes grow with the number of
tasks and long task names (SuperNI's reach 45 characters) are wrapped at underscores, so a
15-task matrix stays readable.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gainlora.artifacts import atomic_write
from gainlora.metrics import average_curve, lower_triangle

Matrix = Sequence[Sequence[float | None]]
CHAR_IN = 0.075  # width of one tick-label character at 8 pt, in inches (for sizing figures)


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path | str) -> Path:
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def wrap_name(name: str, width: int = 18) -> str:
    """``name`` on lines of at most ``width`` characters, broken after underscores (or hard where a
    part is longer); joining the lines gives the name back."""
    parts = name.split("_")
    lines, line = [], ""
    for i, part in enumerate(parts):
        piece = part + ("_" if i < len(parts) - 1 else "")
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
        while len(line) > width:
            lines.append(line[:width])
            line = line[width:]
    return "\n".join([*lines, line] if line or not lines else lines)


def _rows(matrix: Matrix, tasks: Sequence[str]) -> list[list[float]]:
    rows = lower_triangle(matrix)
    if len(tasks) < len(rows):
        raise ValueError(f"{len(rows)} matrix rows but only {len(tasks)} task names")
    return rows


def matrix_figure(matrix: Matrix, tasks: Sequence[str], title: str | None = None, metric: str = "score") -> Figure:
    """Heatmap of R[t][j] (row t = after learning task t, blank above the diagonal), values in the
    cells, task names on both axes, ``metric`` on the colour bar."""
    rows = _rows(matrix, tasks)
    n_rows, n_cols = len(rows), len(tasks)
    grid = np.full((n_rows, n_cols), np.nan)
    for t, row in enumerate(rows):
        grid[t, : len(row)] = row

    labels = [wrap_name(name) for name in tasks]
    longest = max(len(line) for label in labels for line in label.splitlines())
    lines = max(label.count("\n") + 1 for label in labels)
    cell = 0.75 if n_cols <= 8 else 0.6
    label_in = longest * CHAR_IN
    width = n_cols * cell + label_in + 2.2  # y tick labels, axis label, colour bar
    rotation = 45 if lines == 1 else 90  # wrapped labels would overlap their neighbours at 45 degrees
    height = n_rows * max(cell, 0.16 * lines) + (0.75 if rotation == 45 else 1.0) * label_in + 1.4  # + title
    fig = new_figure(max(5.0, width), max(3.5, height))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="white")  # blank above the diagonal
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(image, ax=ax, label=metric, shrink=min(1.0, 0.5 + 0.05 * n_rows))
    fontsize = 9 if n_cols <= 8 else 7.5 if n_cols <= 15 else 6
    for t, row in enumerate(rows):
        for j, value in enumerate(row):
            color = "black" if value >= 60.0 else "white"  # dark on viridis's bright end
            ax.text(j, t, f"{value:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(n_cols), labels=labels, rotation=rotation, ha="right", va="center" if rotation == 90 else
                  "top", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n_rows), labels=labels[:n_rows], fontsize=8)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after learning task t")
    ax.set_title(title or "Score matrix R[t][j]", fontsize=10)
    return fig


def plot_matrix(matrix: Matrix, tasks: Sequence[str], path: Path | str, title: str | None = None,
                metric: str = "score") -> Path:
    return save_png(matrix_figure(matrix, tasks, title, metric), path)


def drops(rows: list[list[float]]) -> list[list[float]]:
    """drop[j][i - j] = R[j][j] - R[i][j] for i >= j: how far task j fell below its own score."""
    return [[rows[j][j] - rows[i][j] for i in range(j, len(rows))] for j in range(len(rows))]


def forgetting_figure(matrix: Matrix, tasks: Sequence[str], title: str | None = None, metric: str = "score") -> Figure:
    """Left: each task's score vs tasks learned, with the average of the seen tasks. Right: its drop
    from its own score right after learning it, R[t][t] - R[i][t], with the mean over earlier tasks
    (-BWT at each point). Legend: the tasks, numbered and named, and the two averages."""
    rows = _rows(matrix, tasks)
    n = len(rows)
    steps = list(range(1, n + 1))
    fig = new_figure(13.0, max(4.8, 0.3 * n + 1.2))
    ax_score, ax_drop = fig.subplots(1, 2)
    palette = colormaps["tab10" if n <= 10 else "tab20"].colors  # the default cycle repeats after 10
    for j, drop in enumerate(drops(rows)):
        style = {"marker": "o", "markersize": 3, "linewidth": 1.2, "color": palette[j % len(palette)]}
        ax_score.plot(steps[j:], [rows[t][j] for t in range(j, n)], label=f"{j + 1}. {wrap_name(tasks[j], 28)}",
                      **style)
        ax_drop.plot(steps[j:], drop, **style)
    ax_score.plot(steps, average_curve(rows), color="black", linestyle="--", linewidth=2.2,
                  label="average of seen tasks")
    mean_drop = [sum(rows[j][j] - rows[i][j] for j in range(i)) / i for i in range(1, n)]
    ax_drop.plot(steps[1:], mean_drop, color="black", linestyle=":", linewidth=2.2,
                 label="mean drop of earlier tasks (-BWT)")
    ax_drop.axhline(0.0, color="grey", linewidth=0.8)
    for ax, what in ((ax_score, f"{metric} of each task"), (ax_drop, f"drop from its own {metric}")):
        ax.set_xlim(0.5, n + 0.5)
        ax.set_xticks(steps)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_score.set_ylim(-2.0, 102.0)
    ax_score.set_title("Score of each task")
    ax_drop.set_title("Drop from its own score: R[t][t] - R[i][t]")
    fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    fig.suptitle(title or "Forgetting curves", fontsize=11)
    return fig


def plot_forgetting(matrix: Matrix, tasks: Sequence[str], path: Path | str, title: str | None = None,
                    metric: str = "score") -> Path:
    return save_png(forgetting_figure(matrix, tasks, title, metric), path)


def plot_task_scores(scores: Sequence[float], tasks: Sequence[str], path: Path | str,
                     title: str | None = None, metric: str = "score") -> Path:
    """Bar chart of one score per task (a multi-task run's single row), with their mean."""
    if len(scores) != len(tasks):
        raise ValueError(f"{len(scores)} scores for {len(tasks)} tasks")
    labels = [wrap_name(name) for name in tasks]
    fig = new_figure(max(5.0, 0.6 * len(tasks) + 2.5), 4.0 + 0.5 * max(label.count("\n") for label in labels))
    ax = fig.subplots()
    ax.bar(range(len(tasks)), scores, color=colormaps["viridis"](0.55))
    for j, value in enumerate(scores):
        ax.text(j, value + 1.0, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    mean = sum(scores) / len(scores)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1.5, label=f"mean (AP) {mean:.1f}")
    ax.set_xticks(range(len(tasks)), labels=labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0.0, 105.0)
    ax.set_ylabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Score per task")
    return save_png(fig, path)
