"""The offline cross-run comparison (``make report``), and reading a run's results.json.

Runs are labelled by method and by the settings that differ between the compared runs' config.yaml
files (``gainlora_inflora optimizer.lr=0.001``), never by their timestamped folder names. Each
report goes in a folder of its own, ``reports/<name>/``. One run's figures: :mod:`gainlora.plots`.

CLI: ``python -m gainlora.report RUN_DIR [RUN_DIR ...] [--name NAME | --out DIR]`` prints the
markdown table.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from gainlora.artifacts import ArtifactError, RunDir, atomic_write, read_config
from gainlora.cli import ArgumentParser, error_line, writable_file
from gainlora.metrics import average_curve, lower_triangle
from gainlora.plots import new_figure, plot_forgetting, plot_matrix, plot_task_scores, save_png
from gainlora.run_kinds import run_kind

__all__ = [
    "ReportError",
    "average_curve",
    "compare_runs",
    "load_results",
    "main",
    "markdown_table",
    "run_labels",
    "plot_forgetting",
    "plot_matrix",
    "plot_task_scores",
    "single_task_scores",
]

RESULTS_FILE = "results.json"
_REQUIRED_KEYS = ("method", "benchmark", "order", "tasks", "matrix")
TABLE_COLUMNS = ("run", "benchmark", "order", "AP", "FT", "BWT", "FWT", "folder")
# Keys that never tell runs apart in a label: where and how a run was written, not what it trained.
UNLABELLED = ("run_id", "resume", "paths", "logger", "derived", "checkpoint", "trainer.enable_progress_bar")
NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,99}")  # a report's folder name, never a path
MAX_SETTINGS = 4  # per label; the rest is counted ("+2 more")


class ReportError(ValueError):
    """A run directory cannot be reported on. The message names the file at fault."""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a score")


def load_results(run_dir: Path | str) -> dict[str, Any]:
    """Read and check a run's results.json (``run_dir`` may also be the file itself)."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / RESULTS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: not found ({run_dir} is not a finished or running run directory)")
    try:
        results = json.loads(path.read_text(), parse_constant=_no_constant)  # a run writes finite scores
    except (OSError, ValueError) as err:  # JSON and decoding errors, an integer of 5000 digits
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


def tested_on(run_dir: Path | str, tasks: Sequence[str]) -> dict[int, list]:
    """{j: task j's test examples (source, references)} as the run's own task folder j scored them,
    for each finished task. FWT's S[j] and R[j][j] must come from the same examples: same task names at
    another seed, or with another test cap, are other examples (the demo's data depends on the seed)."""
    root = RunDir(_run_dir(Path(run_dir)))
    found = {}
    for j, name in enumerate(tasks):
        try:
            rows = json.loads((root.task_dir(j, name) / "predictions.json").read_text())
            found[j] = [(row["source"], list(row["references"])) for row in rows if row["task"] == j]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


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


def _summary(label: str, folder: str, results: dict[str, Any],
             references: dict[tuple[str, ...], tuple[list[float], dict]], path: Path) -> dict[str, Any]:
    kind = run_kind(results.get("run_kind"))
    scores, tests = references.get(tuple(results["tasks"]), (None, {})) if kind.forgetting else (None, {})
    ours = tested_on(path, results["tasks"]) if scores else {}
    other = any(j in tests and tests[j] != examples for j, examples in ours.items())  # checked where both have them
    single_task = None if other else scores
    computed = kind.metrics(results["matrix"], single_task)
    record: dict[str, Any] = {"run": label, "folder": folder}
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


def _run_dir(path: Path) -> Path:
    return path.parent if path.is_file() else path


def flat_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.yaml as {dotted key: value} (lists kept whole); {} when it has none. Read as
    data: nothing it names is built."""
    path = _run_dir(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = node

    try:
        config = OmegaConf.to_container(read_config(path))
    except ArtifactError as err:  # not what a run writes (a YAML bomb included)
        raise ReportError(str(err)) from None
    walk(config, "")
    return flat


def swept_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose values differ between the configs (runs without config.yaml are left out)."""
    known = [c for c in configs if c]
    if len(known) < 2:
        return []
    keys = sorted({k for c in known for k in c})
    return [k for k in keys if not any(k == u or k.startswith(u + ".") for u in UNLABELLED)
            and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in known}) > 1]


def _value(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def run_labels(run_dirs: Sequence[Path], all_results: Sequence[dict[str, Any]]) -> list[str]:
    """``<method> key=value ...``: the method and the settings that differ between the runs (a
    method's own keys only when the method is the same); the folder name where labels still tie."""
    configs = [flat_config(p) for p in run_dirs]
    keys = swept_keys(configs)
    if len({r["method"] for r in all_results}) > 1:  # the method's name stands for its settings
        keys = [k for k in keys if not k.startswith("method.")]
    labels = []
    for config, results in zip(configs, all_results):
        settings = [f"{k}={_value(config[k])}" for k in keys if k in config]
        more = f" +{len(settings) - MAX_SETTINGS} more" if len(settings) > MAX_SETTINGS else ""
        labels.append(" ".join([str(results["method"]), *settings[:MAX_SETTINGS]]) + more)
    return [f"{lab} ({_run_dir(p).name})" if labels.count(lab) > 1 else lab for lab, p in zip(labels, run_dirs)]


def report_name(run_dirs: Sequence[Path], all_results: Sequence[dict[str, Any]]) -> str:
    """A folder name for the comparison: the experiments, then the swept keys, else the methods
    (``demo_optimizer.lr``, ``demo_seqlora-vs-gainlora_inflora``)."""
    experiments = dict.fromkeys(str(r.get("experiment") or _run_dir(p).parent.name)
                                for p, r in zip(run_dirs, all_results))
    methods = list(dict.fromkeys(str(r["method"]) for r in all_results))
    keys = [k for k in swept_keys([flat_config(p) for p in run_dirs]) if k not in ("exp_name", "seed")]
    if len(methods) > 1:
        what = "-vs-".join(methods)
    elif keys:
        what = "+".join(keys)
    else:
        what = "-vs-".join(_run_dir(p).name for p in run_dirs)
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", "+".join(experiments) + "_" + what)[:100].strip("-.")
    return name if NAME.fullmatch(name) else "report"


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
    labels = run_labels(paths, all_results)
    folders = [f"{_run_dir(p).parent.name}/{_run_dir(p).name}" for p in paths]
    references = {}
    for ref in single_task:
        tasks = load_results(ref)["tasks"]
        references[tuple(tasks)] = (single_task_scores(ref, tasks), tested_on(ref, tasks))

    metrics = {results.get("metric") for results in all_results}
    metric = metrics.pop() if len(metrics) == 1 and None not in metrics else "score"  # runs on one metric: its name
    fig = new_figure(12.0, 4.5)
    ax_avg, ax_first = fig.subplots(1, 2)
    for label, results in zip(labels, all_results):
        steps, average, first, style = run_kind(results.get("run_kind")).curves(results["matrix"])
        ax_avg.plot(steps, average, marker="o", markersize=3, linestyle=style, label=label)
        ax_first.plot(steps, first, marker="o", markersize=3, linestyle=style,
                      label=f"{label} ({results['tasks'][0]})")
    for ax, title in ((ax_avg, "Average score of seen tasks"), (ax_first, "Score of the first task")):
        ax.set_title(title)
        ax.set_xlabel("tasks learned")
        ax.set_ylabel(metric)
        ax.set_ylim(-2.0, 102.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    out_dir = Path(out_dir)
    figure_path = save_png(fig, out_dir / "compare.png")
    table = markdown_table([_summary(lab, folder, res, references, path)
                            for lab, folder, res, path in zip(labels, folders, all_results, paths)])
    markdown_path = atomic_write(out_dir / "compare.md", lambda tmp: tmp.write_text(table))
    return figure_path, markdown_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m gainlora.report",
        description="Compare continual-learning runs: writes compare.png and compare.md into a folder of "
                    "their own (reports/<name>/) and prints the table. Runs are labelled by method and by the "
                    "settings that differ between their config.yaml files.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN",
                        help="run directories, or the results.json a run printed")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--name", metavar="NAME",
                       help="the report's folder under reports/ (default: from the experiments and what differs)")
    where.add_argument("--out", metavar="DIR", help="the report's folder itself (instead of --name)")
    parser.add_argument("--single-task", type=Path, action="append", default=[], metavar="RUN_DIR",
                        help="a finished method=single_task run: FWT for runs over the same tasks (repeatable)")
    args = parser.parse_args(argv)
    if args.name is not None and not NAME.fullmatch(args.name):
        return error_line(f"--name={args.name}: a folder name of letters, digits and . _ + - (at most 100)")
    if args.out == "":  # Path("") is the working directory: the report landed in the checkout
        return error_line("--out=: a folder path (or leave --out out for reports/<name>)")
    runs = [p.resolve().parent if p.is_file() else p.resolve() for p in args.run_dirs]
    twice = next((p for p, r in zip(args.run_dirs, runs) if runs.count(r) > 1), None)
    if twice is not None:  # the table had the same run as two rows
        return error_line(f"RUN={twice}: given twice; each run once")
    try:
        for ref in args.single_task:  # named as the option it came from, before anything is drawn
            try:
                load_results(ref)
            except ReportError as err:
                return error_line(f"--single-task={ref}: {err}")
        out = None if args.out is None else Path(args.out)
        if out is None:
            paths = [Path(p) for p in args.run_dirs]
            out = Path("reports") / (args.name or report_name(paths, [load_results(p) for p in paths]))
        unwritable = writable_file(out / "compare.md")
        if unwritable:
            return error_line(f"--out={out}: {unwritable}")
        inside = next((p for p in args.run_dirs if out.resolve().is_relative_to(
            p.resolve().parent if p.is_file() else p.resolve())), None)
        if inside is not None:  # a run directory has one writer: the run
            return error_line(f"--out={out}: inside the run directory {inside}; give a folder outside it")
        figure_path, markdown_path = compare_runs(args.run_dirs, out, single_task=args.single_task)
    except ReportError as err:
        return error_line(str(err))
    print(markdown_path.read_text(), end="")
    print(f"figure: {figure_path}\ntable: {markdown_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
