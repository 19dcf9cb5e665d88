"""The short summary a run prints when it ends, above the path of its results.json: the score matrix
with the task names, AP/FT/BWT/FWT, the run folder and the plots."""
from __future__ import annotations

from pathlib import Path

from gainlora.metrics import joint_row, lower_triangle
from gainlora.progress import duration
from gainlora.run_kinds import run_kind

NAME_WIDTH = 36  # task names longer than this are cut (SuperNI names reach 45 characters)


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


def matrix_text(matrix: list[list[float | None]], tasks: list[str], joint: bool = False) -> list[str]:
    """R[t][j] as aligned text: columns numbered 1..T, rows numbered and named (row t = after task t);
    ``joint``: a multi-task run's single row, every task scored after one fit."""
    rows = [joint_row(matrix)] if joint else lower_triangle(matrix)
    width = max(len(_short(n)) for n in tasks) + 4
    lines = [" " * width + "".join(f"{j + 1:>7}" for j in range(len(tasks)))]
    for t, row in enumerate(rows):
        label = "all tasks jointly" if joint else f"{t + 1:>2} {_short(tasks[t])}"
        lines.append(f"{label:<{width}}" + "".join(f"{v:7.1f}" for v in row))
    return lines


def run_summary(results: dict, run_dir: Path | str) -> str:
    """Matrix, metrics, run folder and plots of a run, in a dozen lines."""
    run_dir = Path(run_dir)
    tasks, matrix = list(results["tasks"]), results["matrix"]
    steps, wall = results.get("steps"), results.get("wall_time_s")
    speed = f", {steps} steps in {duration(wall)} ({steps / wall:.1f} steps/s overall)" if steps and wall else ""
    lines = [f"== {results.get('experiment')} · {results.get('method')} · {results.get('status')}: "
             f"{len(tasks)} task{'' if len(tasks) == 1 else 's'}{speed}"]
    if matrix:
        joint = run_kind(results.get("run_kind")).joint
        lines.append(f"{results.get('metric', 'score')} " + ("on each task after one joint fit (column j: task j)"
                     if joint else "after each task (row t: after learning task t; column j: task j)"))
        lines += matrix_text(matrix, tasks, joint=joint)
    metrics = "  ".join(f"{k} {results[k]:.2f}" for k in ("AP", "FT", "BWT", "FWT")
                        if isinstance(results.get(k), (int, float)))
    if metrics:
        lines.append(metrics)
    lines.append(f"run folder: {run_dir}")
    plots = sorted(run_dir.joinpath("plots").glob("*.png"))
    if plots:
        lines.append("plots: " + "  ".join(str(p) for p in plots))
    return "\n".join(lines)
