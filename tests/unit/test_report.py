"""Plots and the offline cross-run comparison."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gainlora.artifacts import atomic_write
from gainlora.report import (
    ReportError,
    average_curve,
    compare_runs,
    load_results,
    main,
    plot_forgetting,
    plot_matrix,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["yelp", "amazon", "mnli"]
MATRIX = [[60.0, None, None], [80.0, 90.0, None], [70.0, 50.0, 85.0]]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 2000  # a real drawing, not an empty canvas header
    # The atomic write leaves no temp file behind.
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_average_curve() -> None:
    assert average_curve(MATRIX) == pytest.approx([60.0, 85.0, 205 / 3])


@pytest.mark.parametrize("plot", [plot_matrix, plot_forgetting])
def test_plots_write_png(plot, tmp_path: Path) -> None:
    path = plot(MATRIX, TASKS, tmp_path / "plots" / "fig.png", title="t")
    assert path == tmp_path / "plots" / "fig.png"
    _assert_png(path)


@pytest.mark.parametrize("plot", [plot_matrix, plot_forgetting])
def test_plots_handle_partial_and_ragged_matrices(plot, tmp_path: Path) -> None:
    # After 2 of 3 tasks, ragged lower triangle.
    _assert_png(plot([[60.0], [80.0, 90.0]], TASKS, tmp_path / "partial.png"))
    _assert_png(plot([[55.5]], TASKS[:1], tmp_path / "one.png"))


def test_plot_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "matrix.png"
    path.write_bytes(b"stale")
    plot_matrix(MATRIX, TASKS, path)
    _assert_png(path)


def test_plots_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 matrix rows but only 2 task names"):
        plot_matrix(MATRIX, TASKS[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="above the diagonal"):
        plot_forgetting([[1.0, 2.0]], TASKS, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.md"
    path.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.md"]


def _write_run(run_dir: Path, **overrides) -> Path:
    results = {
        "experiment": run_dir.parent.name,
        "method": "gainlora_inflora",
        "benchmark": "superni",
        "order": 1,
        "tasks": TASKS,
        "metric": "rougeL",
        "matrix": MATRIX,
        "AP": 68.3333,
        "FT": 25.0,
        "BWT": -15.0,
        "BWT_ref": -10.0,
        "FWT": None,
        "FWT_diag": 78.3333,
        "seed": 42,
        "selection": "last",
        "wall_time_s": 12.5,
        "status": "done",
    }
    results.update(overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_compare_runs_writes_figure_and_table(tmp_path: Path) -> None:
    run_a = _write_run(tmp_path / "runs" / "t5_order1" / "2025-01-01_00-00-00")
    # A run still in progress, without stored metrics: they come from its partial matrix.
    run_b = _write_run(
        tmp_path / "runs" / "t5_lora_order1" / "2025-01-02_00-00-00",
        method="lora", order="2", matrix=[[60.0, None, None], [30.0, 90.0, None]],
        AP=None, FT=None, BWT=None, FWT=1.5, status="running",
    )
    figure, markdown = compare_runs([run_a, run_b], tmp_path / "report")
    assert figure == tmp_path / "report" / "compare.png"
    assert markdown == tmp_path / "report" / "compare.md"
    _assert_png(figure)

    lines = markdown.read_text().splitlines()
    assert lines[0] == "| run | method | benchmark | order | AP | FT | BWT | FWT |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| 2025-01-01_00-00-00 | gainlora_inflora | superni | 1 | 68.33 | 25.00 | -15.00 | - |"
    # Computed from the partial matrix: AP (30+90)/2 = 60, FT = 60-30 = 30, BWT = 30-60 = -30.
    assert lines[3] == "| 2025-01-02_00-00-00 | lora | superni | 2 | 60.00 | 30.00 | -30.00 | 1.50 |"
    assert len(lines) == 4


def test_compare_runs_disambiguates_equal_run_names(tmp_path: Path) -> None:
    run_a = _write_run(tmp_path / "expA" / "run")
    run_b = _write_run(tmp_path / "expB" / "run")
    _, markdown = compare_runs([run_a, run_b], tmp_path / "out")
    rows = markdown.read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| expA/run", "| expB/run"]


def test_compare_runs_missing_results_names_file(tmp_path: Path) -> None:
    good = _write_run(tmp_path / "exp" / "good")
    empty = tmp_path / "exp" / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"exp/empty/results\.json: not found"):
        compare_runs([good, empty], tmp_path / "out")
    assert not (tmp_path / "out" / "compare.md").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read results"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"method": "m", "benchmark": "b", "order": 1, "tasks": TASKS}), "missing key.*matrix"),
        (
            json.dumps({"method": "m", "benchmark": "b", "order": 1, "tasks": TASKS, "matrix": [[1, 2]]}),
            "bad matrix.*above the diagonal",
        ),
        (
            json.dumps({"method": "m", "benchmark": "b", "order": 1, "tasks": ["a"], "matrix": [[1], [1, 2]]}),
            "bad matrix.*2 matrix rows but only 1 task names",
        ),
    ],
)
def test_load_results_malformed_names_file(tmp_path: Path, content: str, message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(content)
    with pytest.raises(ReportError, match=rf"{run}/results\.json: {message}"):
        load_results(run)


def test_cli_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "exp" / "r1")
    out = tmp_path / "dash"
    assert main([str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "compare.md").read_text()
    assert "| r1 | gainlora_inflora | superni | 1 | 68.33 |" in printed
    assert (out / "compare.png").is_file()


def test_cli_reports_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope/results.json: not found" in capsys.readouterr().err
