"""Plots, the offline cross-run comparison (labels, report folders) and the run summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gainlora.artifacts import atomic_write
from gainlora.plots import forgetting_figure, matrix_figure, wrap_name
from gainlora.report import (
    ReportError,
    average_curve,
    compare_runs,
    load_results,
    main,
    plot_forgetting,
    plot_matrix,
    report_name,
    run_labels,
)
from gainlora.summary import run_summary

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
    assert lines[0] == "| run | benchmark | order | AP | FT | BWT | FWT | folder |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    # Labelled by method (no config.yaml: no settings to add), never by the timestamped folder.
    assert lines[2] == "| gainlora_inflora | superni | 1 | 68.33 | 25.00 | -15.00 | - | t5_order1/2025-01-01_00-00-00 |"
    # Computed from the partial matrix: AP (30+90)/2 = 60, FT = 60-30 = 30, BWT = 30-60 = -30.
    assert lines[3] == "| lora | superni | 2 | 60.00 | 30.00 | -30.00 | 1.50 | t5_lora_order1/2025-01-02_00-00-00 |"
    assert len(lines) == 4


def test_compare_figure_names_the_runs_metric(tmp_path: Path, monkeypatch) -> None:
    import gainlora.report as report

    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig) or Path(path))
    runs = [_write_run(tmp_path / name / "r", metric="exact_match") for name in ("a", "b")]
    compare_runs(runs, tmp_path / "one")
    _write_run(tmp_path / "c" / "r", metric="rougeL")
    compare_runs([runs[0], tmp_path / "c" / "r"], tmp_path / "two")
    assert [[ax.get_ylabel() for ax in fig.axes] for fig in figures] == [["exact_match"] * 2, ["score"] * 2]


def test_compare_runs_disambiguates_equal_labels_by_folder(tmp_path: Path) -> None:
    run_a = _write_run(tmp_path / "expA" / "run1")
    run_b = _write_run(tmp_path / "expB" / "run2")
    _, markdown = compare_runs([run_a, run_b], tmp_path / "out")
    rows = markdown.read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| gainlora_inflora (run1)", "| gainlora_inflora (run2)"]


def _config(run_dir: Path, lr: float, seed: int = 0, method: str = "gainlora_inflora", hidden: int = 100) -> None:
    (run_dir / "config.yaml").write_text(
        f"exp_name: demo\nrun_id: {run_dir.name}\nseed: {seed}\nresume: false\n"
        f"paths:\n  run_dir: {run_dir}\noptimizer:\n  lr: {lr}\n  weight_decay: 0.0\n"
        f"method:\n  _target_: gainlora.methods.{method}\n  hidden: {hidden}\n")


def test_labels_name_the_method_and_the_settings_that_differ(tmp_path: Path) -> None:
    runs = [_write_run(tmp_path / "demo" / f"2026010{i}-000000") for i in range(3)]
    for run, lr, seed in zip(runs, (1e-3, 3e-3, 3e-3), (0, 0, 1)):
        _config(run, lr, seed)
    results = [load_results(r) for r in runs]
    # run_id and paths differ too, but say nothing about what was trained.
    assert run_labels(runs, results) == ["gainlora_inflora optimizer.lr=0.001 seed=0",
                                         "gainlora_inflora optimizer.lr=0.003 seed=0",
                                         "gainlora_inflora optimizer.lr=0.003 seed=1"]
    assert report_name(runs, results) == "demo_optimizer.lr"  # seeds repeat a setting: not in the name
    # The results.json a run prints is accepted in place of its folder.
    assert run_labels([r / "results.json" for r in runs[:2]], results[:2])[1] == "gainlora_inflora optimizer.lr=0.003"


def test_labels_drop_a_methods_own_keys_when_methods_differ(tmp_path: Path) -> None:
    a, b = _write_run(tmp_path / "demo" / "a"), _write_run(tmp_path / "demo" / "b", method="seqlora")
    _config(a, 1e-3, method="GainLoRA", hidden=100)
    _config(b, 1e-3, method="SeqLoRA", hidden=50)
    results = [load_results(a), load_results(b)]
    assert run_labels([a, b], results) == ["gainlora_inflora", "seqlora"]
    assert report_name([a, b], results) == "demo_gainlora_inflora-vs-seqlora"


def test_cli_writes_each_report_in_its_own_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = _write_run(tmp_path / "demo" / "a"), _write_run(tmp_path / "demo" / "b")
    _config(a, 1e-3)
    _config(b, 3e-3)
    assert main([str(a), str(b)]) == 0
    assert (tmp_path / "reports" / "demo_optimizer.lr" / "compare.md").is_file()
    assert main([str(a), str(b), "--name", "lr-sweep"]) == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["demo_optimizer.lr", "lr-sweep"]
    assert "| gainlora_inflora optimizer.lr=0.003 |" in capsys.readouterr().out
    assert main([str(a), "--name", "../escape"]) == 2
    assert capsys.readouterr().err.startswith("error: --name=../escape: a folder name")


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
        (  # a run writes finite scores; NaN would flow into AP and the tables unremarked
            '{"method": "m", "benchmark": "b", "order": 1, "tasks": ["a"], "matrix": [[NaN]]}',
            "cannot read results: NaN is not a score",
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
    assert "| gainlora_inflora | superni | 1 | 68.33 |" in printed
    assert (out / "compare.png").is_file()


def test_cli_reports_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope/results.json: not found" in err and err.count("\n") == 1


SUPERNI = ["task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization",
           "task181_outcome_extraction", "task002_quoref_answer_generation", "task1510_evalution_relation_extraction",
           "task639_multi_woz_user_utterance_generation", "task1729_personachat_generate_next",
           "task073_commonsenseqa_answer_generation", "task1590_diplomacy_text_generation",
           "task748_glucose_reverse_cause_event_detection", "task511_reddit_tifu_long_text_summarization",
           "task591_sciq_answer_generation", "task1687_sentiment140_classification", "task875_emotion_classification"]


def _square(n: int) -> list[list[float | None]]:
    return [[50.0 + t - j if j <= t else None for j in range(n)] for t in range(n)]


def test_wrap_name_keeps_the_name() -> None:
    for name in [*SUPERNI, "x" * 40, "a__b", "short"]:
        wrapped = wrap_name(name)
        assert wrapped.replace("\n", "") == name
        assert max(len(line) for line in wrapped.splitlines()) <= 18


def test_heatmap_grows_with_the_tasks_and_names_them() -> None:
    small = matrix_figure(_square(4), TASKS + ["yahoo"], metric="rougeL")
    big = matrix_figure(_square(15), SUPERNI, title="t5 · gainlora\nAP 46.20 · FT 2.60", metric="rougeL")
    (w4, h4), (w15, h15) = small.get_size_inches(), big.get_size_inches()
    assert w15 > w4 + 5 and h15 > h4 + 5  # 15 tasks get room: no sliver
    ax, bar = big.axes
    assert [t.get_text().replace("\n", "") for t in ax.get_xticklabels()] == SUPERNI
    assert [t.get_text().replace("\n", "") for t in ax.get_yticklabels()] == SUPERNI
    assert bar.get_ylabel() == "rougeL"
    assert "AP 46.20" in ax.get_title()
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 15 * 16 // 2 and cells[0] == "50.0"  # every value of the lower triangle


def test_forgetting_plot_shows_the_drop_from_each_tasks_own_score() -> None:
    matrix = [[60.0, None, None], [40.0, 90.0, None], [30.0, 85.0, 70.0]]
    fig = forgetting_figure(matrix, TASKS)
    drop_ax = fig.axes[1]
    curves = [[float(y) for y in line.get_ydata()] for line in drop_ax.get_lines()]
    assert [0.0, 20.0, 30.0] in curves and [0.0, 5.0] in curves  # R[t][t] - R[i][t] per task
    assert [20.0, 17.5] in curves  # mean over earlier tasks, -BWT: (30 + 5) / 2 at the end


def test_run_summary_names_matrix_metrics_folder_and_plots(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "demo" / "r1", experiment="demo", steps=1200, wall_time_s=40.0)
    (run / "plots").mkdir()
    (run / "plots" / "matrix.png").write_bytes(PNG_MAGIC)
    text = run_summary(load_results(run), run)
    assert "1200 steps in 40 s (30.0 steps/s overall)" in text
    assert "AP 68.33  FT 25.00  BWT -15.00" in text
    assert f"run folder: {run}" in text and str(run / "plots" / "matrix.png") in text
    rows = text.splitlines()
    assert rows[3].split() == ["1", "yelp", "60.0"] and rows[5].split() == ["3", "mnli", "70.0", "50.0", "85.0"]
    assert ": 3 tasks, 1200 steps" in rows[0] and "after learning task t" in rows[1]


def test_run_summary_of_one_task_and_of_a_joint_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "demo" / "r1", experiment="demo", steps=10, wall_time_s=2.0)
    one = {**load_results(run), "tasks": ["yelp"], "matrix": [[60.0]]}
    assert ": 1 task, 10 steps" in run_summary(one, run).splitlines()[0]
    joint = {**load_results(run), "run_kind": "multi_task", "matrix": [[60.0, 40.0, 70.0]]}
    rows = run_summary(joint, run).splitlines()
    assert "after one joint fit" in rows[1] and "after learning task t" not in rows[1]
    assert rows[3].split() == ["all", "tasks", "jointly", "60.0", "40.0", "70.0"]



def test_cli_names_an_unreadable_config_and_an_unwritable_out(tmp_path: Path, capsys) -> None:
    """Each mistake is one error line, and nothing is written."""
    good, other = _write_run(tmp_path / "exp" / "a"), _write_run(tmp_path / "exp" / "b")
    (other / "config.yaml").write_text("a: [unclosed\n")
    assert main([str(good), str(other), "--out", str(tmp_path / "o")]) == 2
    (other / "config.yaml").write_text("- 1\n")
    assert main([str(good), str(other), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "file").write_text("")
    assert main([str(good), "--out", str(tmp_path / "file" / "o")]) == 2
    assert main([str(good / "results.json"), "--out", str(good / "report")]) == 2  # the run's own folder
    assert main([str(good), "--single-task", str(tmp_path / "st"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit) as stopped:
        main([str(good), "--out", str(tmp_path / "o"), "--name", "x"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {other}/config.yaml: not a readable config (while parsing a flow sequence)",
        f"error: {other}/config.yaml: not a run config (a mapping of sections)",
        f"error: --out={tmp_path}/file/o: {tmp_path}/file is not a directory",
        f"error: --out={good}/report: inside the run directory {good}/results.json; give a folder outside it",
        # named the file only, not the option it came from
        f"error: --single-task={tmp_path}/st: {tmp_path}/st/results.json: not found ({tmp_path}/st is not a finished "
        "or running run directory)",
        "error: --name: not allowed with --out"]
    assert not (good / "report").exists()
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_empty_out_and_a_run_given_twice(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--out ''`` wrote compare.md into the working directory; a run given twice (as its folder and
    its results.json) was two identical rows."""
    run = _write_run(tmp_path / "exp" / "a")
    monkeypatch.chdir(tmp_path)
    assert main([str(run), "--out", ""]) == 2
    assert main([str(run), str(run / "results.json"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --out=: a folder path (or leave --out out for reports/<name>)",
        f"error: RUN={run}: given twice; each run once",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
