"""Plots of the accuracy matrix and the offline cross-run comparison (``make report``).

Figures are drawn on bare ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot): nothing
global is switched, no display is needed, and callbacks can plot from any thread.

CLI: ``python -m gainlora.report RUN_DIR [RUN_DIR ...] --out DIR`` prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gainlora.artifacts import atomic_write
from gainlora.metrics import average_curve, lower_triangle
from gainlora.run_kinds import run_kind

__all__ = [
    "ReportError",
    "average_curve",
    "compare_runs",
    "load_results",
    "main",
    "markdown_table",
    "plot_forgetting",
    "plot_matrix",
    "plot_task_scores",
    "single_task_scores",
]

Matrix = Sequence[Sequence[float | None]]

RESULTS_FILE = "results.json"
_REQUIRED_KEYS = ("method", "benchmark", "order", "tasks", "matrix")
TABLE_COLUMNS = ("run", "method", "benchmark", "order", "AP", "FT", "BWT", "FWT")


class ReportError(ValueError):
    """A run directory cannot be reported on. The message names the file at fault."""


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _rows_and_tasks(matrix: Matrix, tasks: Sequence[str]) -> list[list[float]]:
    rows = lower_triangle(matrix)
    if len(tasks) < len(rows):
        raise ValueError(f"{len(rows)} matrix rows but only {len(tasks)} task names")
    return rows


def plot_matrix(matrix: Matrix, tasks: Sequence[str], path: Path | str, title: str | None = None) -> Path:
    """Heatmap of R[t][j]: row t = after learning task t, blank above the diagonal."""
    rows = _rows_and_tasks(matrix, tasks)
    n_rows, n_cols = len(rows), len(tasks)
    grid = np.full((n_rows, n_cols), np.nan)
    for t, row in enumerate(rows):
        grid[t, : t + 1] = row

    fig = _new_figure(max(4.0, 0.65 * n_cols + 2.5), max(3.0, 0.5 * n_rows + 1.8))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="white")  # blank above the diagonal
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="score")
    fontsize = 9 if n_cols <= 8 else 7 if n_cols <= 12 else 6
    for t, row in enumerate(rows):
        for j, value in enumerate(row):
            # Dark text on the bright (high) end of viridis, light text on the dark end.
            color = "black" if value >= 60.0 else "white"
            ax.text(j, t, f"{value:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(n_cols), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(n_rows), labels=[f"after {t + 1}: {tasks[t]}" for t in range(n_rows)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("tasks learned")
    ax.set_title(title or "Score matrix R[t][j]")
    return _save_png(fig, Path(path))


def plot_forgetting(
    matrix: Matrix, tasks: Sequence[str], path: Path | str, title: str | None = None
) -> Path:
    """Score of each task vs number of tasks learned (from when it was learned), plus the average."""
    rows = _rows_and_tasks(matrix, tasks)
    n_rows = len(rows)
    steps = list(range(1, n_rows + 1))

    fig = _new_figure(8.0, 4.5)
    ax = fig.subplots()
    # The default cycle repeats after 10 colours; long benchmarks have 15 tasks.
    palette = colormaps["tab10" if n_rows <= 10 else "tab20"].colors
    for j in range(n_rows):
        ax.plot(steps[j:], [rows[t][j] for t in range(j, n_rows)], marker="o", markersize=3,
                linewidth=1.2, color=palette[j % len(palette)], label=f"{j + 1}: {tasks[j]}")
    ax.plot(steps, average_curve(rows), color="black", linestyle="--", linewidth=2.2,
            label="average of seen tasks")
    ax.set_xlim(0.5, n_rows + 0.5)
    ax.set_xticks(steps)
    ax.set_ylim(-2.0, 102.0)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Forgetting curves")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _save_png(fig, Path(path))


def plot_task_scores(scores: Sequence[float], tasks: Sequence[str], path: Path | str,
                     title: str | None = None) -> Path:
    """Bar chart of one score per task (a multi-task run's single row), with their mean."""
    if len(scores) != len(tasks):
        raise ValueError(f"{len(scores)} scores for {len(tasks)} tasks")
    fig = _new_figure(max(5.0, 0.65 * len(tasks) + 2.5), 4.0)
    ax = fig.subplots()
    ax.bar(range(len(tasks)), scores, color=colormaps["viridis"](0.55))
    for j, value in enumerate(scores):
        ax.text(j, value + 1.0, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    mean = sum(scores) / len(scores)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1.5, label=f"mean (AP) {mean:.1f}")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    ax.set_ylim(0.0, 105.0)
    ax.set_ylabel("score")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Score per task")
    return _save_png(fig, Path(path))


def load_results(run_dir: Path | str) -> dict[str, Any]:
    """Read and check a run's results.json (``run_dir`` may also be the file itself)."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / RESULTS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: not found ({run_dir} is not a finished or running run directory)")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read results: {err}") from err
    if not isinstance(results, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(results).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in results]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(results["tasks"], list) or not isinstance(results["matrix"], list):
        raise ReportError(f"{path}: 'tasks' and 'matrix' must be lists")
    try:
        kind = run_kind(results.get("run_kind"))
    except ValueError as err:
        raise ReportError(f"{path}: {err}") from None
    try:
        kind.check(results["matrix"], results["tasks"])
    except (ValueError, TypeError) as err:
        raise ReportError(f"{path}: bad matrix: {err}") from err
    return results


def single_task_scores(run_dir: Path | str, tasks: Sequence[str]) -> list[float]:
    """S[j] for FWT: the diagonal of a finished ``method=single_task`` run over exactly ``tasks``.

    Raises :class:`ReportError` with one line naming the file and what does not fit.
    """
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / RESULTS_FILE
    results = load_results(run_dir)
    kind = run_kind(results.get("run_kind")).name
    if kind != "single_task":
        raise ReportError(f"{path}: not a single-task reference run (method {results['method']!r}, run_kind "
                          f"{kind!r}); make one with method=single_task")
    if results.get("status") != "finished":
        raise ReportError(f"{path}: status is {results.get('status')!r}, not 'finished'; finish that run first "
                          "(resume=true)")
    theirs, ours = list(results["tasks"]), list(tasks)
    if theirs != ours:
        raise ReportError(f"{path}: its tasks {theirs} differ from this run's {ours}")
    rows = lower_triangle(results["matrix"])
    if len(rows) != len(ours):
        raise ReportError(f"{path}: {len(rows)} matrix rows for {len(ours)} tasks")
    return [rows[j][j] for j in range(len(ours))]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table with :data:`TABLE_COLUMNS`, one line per record."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def _summary(label: str, results: dict[str, Any],
             references: dict[tuple[str, ...], list[float]]) -> dict[str, Any]:
    kind = run_kind(results.get("run_kind"))
    single_task = references.get(tuple(results["tasks"])) if kind.forgetting else None
    computed = kind.metrics(results["matrix"], single_task)
    record: dict[str, Any] = {"run": label}
    record.update({k: results[k] for k in ("method", "benchmark", "order")})
    # Stored numbers are what the run reported; fall back to the matrix for older/partial files
    # (for reference runs FT and BWT stay None: they do not apply).
    for key in ("AP", "FT", "BWT"):
        stored = results.get(key)
        record[key] = float(stored) if isinstance(stored, (int, float)) else computed[key]
    # FWT needs single-task scores: the run's own (metrics.single_task_run), else a --single-task run.
    fwt = results.get("FWT")
    record["FWT"] = float(fwt) if isinstance(fwt, (int, float)) else computed["FWT"]
    return record


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run directory names, qualified by their experiment directory where names collide."""
    names = [p.name if p.is_dir() else p.parent.name for p in run_dirs]
    dirs = [p if p.is_dir() else p.parent for p in run_dirs]
    labels = [f"{d.parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]
    return [f"{lab} [{i + 1}]" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def compare_runs(run_dirs: Sequence[Path | str], out_dir: Path | str,
                 single_task: Sequence[Path | str] = ()) -> tuple[Path, Path]:
    """Side-by-side comparison of runs: a figure and a markdown table in ``out_dir``.

    Left panel: average score of the seen tasks vs tasks learned; right panel: score of each run's
    first task vs tasks learned (its forgetting). Reference runs are drawn as dashed (multi-task)
    or dotted (single-task) lines. ``single_task``: finished single-task runs; a continual run
    whose results hold no FWT gets it from the one with the same task list. Returns (figure path,
    markdown path).
    """
    if not run_dirs:
        raise ReportError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    all_results = [load_results(p) for p in paths]
    labels = _labels(paths)
    references = {}
    for ref in single_task:
        tasks = load_results(ref)["tasks"]
        references[tuple(tasks)] = single_task_scores(ref, tasks)

    fig = _new_figure(12.0, 4.5)
    ax_avg, ax_first = fig.subplots(1, 2)
    for label, results in zip(labels, all_results):
        steps, average, first, style = run_kind(results.get("run_kind")).curves(results["matrix"])
        ax_avg.plot(steps, average, marker="o", markersize=3, linestyle=style, label=label)
        ax_first.plot(steps, first, marker="o", markersize=3, linestyle=style,
                      label=f"{label} ({results['tasks'][0]})")
    for ax, title in ((ax_avg, "Average score of seen tasks"), (ax_first, "Score of the first task")):
        ax.set_title(title)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("score")
        ax.set_ylim(-2.0, 102.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    out_dir = Path(out_dir)
    figure_path = _save_png(fig, out_dir / "compare.png")
    table = markdown_table([_summary(lab, res, references) for lab, res in zip(labels, all_results)])
    markdown_path = atomic_write(out_dir / "compare.md", lambda tmp: tmp.write_text(table))
    return figure_path, markdown_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gainlora.report",
        description="Compare continual-learning runs: writes compare.png and compare.md.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (each holding results.json)")
    parser.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR",
                        help="output directory (default: reports)")
    parser.add_argument("--single-task", type=Path, action="append", default=[], metavar="RUN_DIR",
                        help="a finished method=single_task run: FWT for runs over the same tasks (repeatable)")
    args = parser.parse_args(argv)
    try:
        figure_path, markdown_path = compare_runs(args.run_dirs, args.out, single_task=args.single_task)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown_path.read_text(), end="")
    print(f"figure: {figure_path}\ntable: {markdown_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
