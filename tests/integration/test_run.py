"""End to end: the entry point on a tiny backbone, the run-directory contract, load_run,
determinism, resuming after a hard kill (mid-task, mid-epoch, right after a task's DONE marker,
during the metrics.csv write), Ctrl-C, a one-task stream, and a damaged task folder."""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=demo", "backbone=tiny_t5_test", "benchmark.n_train=48", "benchmark.n_val=8",
        "benchmark.n_test=16", "data.batch_size=16", "trainer.enable_progress_bar=false"]

pytestmark = pytest.mark.slow


def launch(runs: Path, *overrides: str, wait: bool = True, entry: tuple[str, ...] = ("-m", "gainlora.run"),
           check: bool = True):
    cmd = [sys.executable, *entry, *TINY, f"paths.runs_dir={runs}", *overrides]
    # One thread: a multi-threaded BLAS may split work by the machine's load, and an untrained tiny
    # model's greedy answers flip on such last-bit differences.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def results_of(path: Path) -> dict:
    return json.loads(path.read_text())


TWO = ("benchmark.num_tasks=2", "trainer.max_steps=8", "trainer.log_every_n_steps=2")


def cl_rows(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return [row["cl/task"] for row in csv.DictReader(file) if row.get("cl/task")]


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    done = launch(runs, *TWO, "run_id=r1")
    return Path(done.stdout.strip().splitlines()[-1]), done


def test_results_contract(two_task_run):
    results_path, done = two_task_run
    assert results_path.name == "results.json" and results_path.is_file()  # printed last
    run_dir = results_path.parent
    results = results_of(results_path)
    for key in ("experiment", "method", "benchmark", "order", "tasks", "metric", "matrix", "AP", "FT", "BWT",
                "BWT_ref", "FWT", "FWT_diag", "seed", "selection", "wall_time_s", "status"):
        assert key in results, key
    assert results["status"] == "finished" and results["method"] == "gainlora_inflora"
    matrix = results["matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and all(v is not None for v in matrix[1])
    assert results["AP"] == pytest.approx(sum(matrix[1]) / 2)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    for plot in ("matrix.png", "forgetting.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    for t, name in enumerate(results["tasks"]):
        task_dir = run_dir / "tasks" / f"{t + 1:02d}-{name}"
        assert (task_dir / "DONE").is_file()
        assert {p.name for p in task_dir.glob("*.safetensors")} == {"branch.safetensors", "gate.safetensors",
                                                                    "memory.safetensors"}
    assert "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]


def test_load_run_reproduces_final_predictions(two_task_run):
    import gainlora

    recorded = json.loads((two_task_run[0].parent / "predictions.json").read_text())
    model = gainlora.load_run(two_task_run[0])  # the results.json path a run prints last
    assert model.tasks == results_of(two_task_run[0])["tasks"]
    again = model.generate([r["source"] for r in recorded], batch_size=7)  # other batching on purpose
    assert again == [r["prediction"] for r in recorded]


def test_run_ends_with_a_summary_and_without_lightning_chatter(two_task_run):
    results_path, done = two_task_run
    run_dir = results_path.parent
    out = done.stdout.splitlines()
    assert out[-1] == str(results_path)  # still the last line
    summary = "\n".join(out[out.index(next(line for line in out if line.startswith("== demo"))):])
    assert "gainlora_inflora · finished: 2 tasks, 16 steps" in summary
    results = results_of(results_path)
    assert f"AP {results['AP']:.2f}  FT {results['FT']:.2f}" in summary
    assert f"run folder: {run_dir}" in summary and str(run_dir / "plots" / "matrix.png") in summary
    names = results["tasks"]
    assert any(line.split()[:2] == ["2", names[1]] for line in out)  # the matrix, rows named
    assert any(line.startswith("[gainlora] task 1/2 demo_colour: 8 steps, ") and "sequence ETA" in line for line in out)
    for noise in ("GPU available", "TPU available", "Tip:", "LeafSpec", "LOCAL_RANK"):
        assert noise not in done.stdout + done.stderr, noise


def test_metrics_csv_rows_carry_task_and_global_step(two_task_run):
    with open(two_task_run[0].parent / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {"task", "global_step", "step"} <= set(rows[0])
    tasks = [int(r["task"]) for r in rows]
    steps = [int(r["global_step"]) for r in rows]
    assert tasks == sorted(tasks) and set(tasks) == {1, 2}
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # global: never restarts with a task
    assert [int(r["global_step"]) for r in rows if r.get("cl/task")] == [8, 16]  # 8 steps per task
    second = [r for r in rows if r["task"] == "2" and not r.get("cl/task")]
    assert all(int(r["global_step"]) == 8 + int(r["step"]) for r in second)  # Lightning's step restarts
    assert results_of(two_task_run[0])["steps"] == 16


def test_multirun_writes_a_sweep_table_and_no_empty_folders(tmp_path):
    done = launch(tmp_path, "benchmark.num_tasks=1", "trainer.max_steps=2", "optimizer.lr=1e-3,3e-3",
                  entry=("-m", "gainlora.run", "-m"))
    empty = [p for p in tmp_path.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not empty, empty  # Hydra's per-job folders used to stay empty
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert (sweep / "multirun.yaml").is_file() and (sweep / "compare.png").is_file()
    table = (sweep / "compare.md").read_text()
    labels = [row.split(" | ")[0].lstrip("| ") for row in table.splitlines()[2:]]
    assert labels == ["gainlora_inflora optimizer.lr=0.001", "gainlora_inflora optimizer.lr=0.003"]
    assert table in done.stdout  # printed as well


def test_existing_run_dir_is_refused(two_task_run, tmp_path):
    run_dir = two_task_run[0].parent
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, f"paths.runs_dir={run_dir.parent.parent}", "run_id=r1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "already holds a run" in done.stdout + done.stderr


THREE = ("benchmark.num_tasks=3", "trainer.max_steps=12")


@pytest.fixture(scope="module")
def reference_matrix(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ref")
    done = launch(runs, *THREE, "run_id=a")
    return results_of(Path(done.stdout.strip().splitlines()[-1]))["matrix"], runs


def test_same_seed_same_matrix(reference_matrix):
    matrix, runs = reference_matrix
    done = launch(runs, *THREE, "run_id=b")
    assert results_of(Path(done.stdout.strip().splitlines()[-1]))["matrix"] == matrix


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_signal_in_task_two(sig, reference_matrix, tmp_path):
    matrix, _ = reference_matrix
    proc = launch(tmp_path, *THREE, "run_id=k", wait=False)
    deadline = time.time() + 300
    for line in proc.stdout:  # kill as soon as task 2 begins: mid-task by construction
        if "task 2/3" in line and "start" in line:
            break
        assert time.time() < deadline
    proc.send_signal(sig)
    rest = proc.communicate(timeout=120)[0]
    run_dir = tmp_path / "demo" / "k"
    assert (run_dir / "tasks" / "01-demo_colour" / "DONE").is_file()
    assert not list((run_dir / "tasks").glob("02-*/DONE")), "task 2 finished before the kill"
    if sig == signal.SIGKILL:
        done = launch(tmp_path, *THREE, "run_id=k", "resume=true")
    else:  # a clean stop (Ctrl-C too): says so, exits 128 + signal, records the state, prints how to resume
        assert proc.returncode == 128 + sig, rest[-2000:]
        assert results_of(run_dir / "results.json")["status"] == "interrupted"
        command = rest.split("resume with:\n", 1)[1].splitlines()[0].strip()
        args = shlex.split(command)
        assert args[:3] == ["python", "-m", "gainlora.run"] and args[-2:] == ["resume=true", "run_id=k"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)  # the printed command, as given
        assert done.returncode == 0, done.stderr[-3000:]
    assert "finished earlier, restored" in done.stdout
    assert cl_rows(run_dir) == ["1", "2", "3"]  # task 1's row, written before the kill, survived
    assert results_of(run_dir / "results.json")["matrix"] == matrix


def killed_at_task_2_checkpoint(tmp_path: Path, run_id: str, *overrides: str) -> Path:
    """The run directory of a three-task demo run SIGKILLed once task 2 has written its first
    in-task checkpoint (and before task 2 finished)."""
    proc = launch(tmp_path, *THREE, *overrides, f"run_id={run_id}", wait=False)
    run_dir = tmp_path / "demo" / run_id
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("02-*/last.ckpt")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint of task 2 was written"
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    assert not list((run_dir / "tasks").glob("02-*/DONE")), "task 2 finished before the kill"
    return run_dir


def test_resume_inside_a_task_from_a_mid_epoch_checkpoint(reference_matrix, tmp_path):
    """SIGKILL after a mid-epoch step checkpoint of task 2 (3 batches an epoch, a checkpoint every
    5 steps: at steps 5 and 10, never at an epoch end): the resumed run continues task 2 from that
    batch and still gives the uninterrupted matrix. Lightning's ModelCheckpoint(save_top_k=0,
    save_last=True) wrote its file only when the task's training ended."""
    import torch

    matrix, _ = reference_matrix
    every = "checkpoint.every_n_train_steps=5"
    run_dir = killed_at_task_2_checkpoint(tmp_path, "c", every)
    assert not (run_dir / "checkpoints" / "01-demo_colour").exists()  # removed once task 1 was done
    saved = torch.load(run_dir / "checkpoints" / "02-demo_parity" / "last.ckpt", weights_only=True)
    (position,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved["global_step"] in (5, 10) and position["batches"] in (1, 2), (saved["global_step"], position)
    done = launch(tmp_path, *THREE, every, "run_id=c", "resume=true")
    assert "task 2/3 demo_parity: continuing from its checkpoint checkpoints/02-demo_parity/last.ckpt" in done.stdout
    assert results_of(run_dir / "results.json")["matrix"] == matrix
    assert not (run_dir / "checkpoints").exists()  # finished: no checkpoint left behind


def test_resume_inside_a_task_from_an_epoch_end_checkpoint(reference_matrix, tmp_path):
    """SIGKILL after task 2's first checkpoint with the default cadence (every epoch: written after the
    epoch's last batch, step 3): the resumed task trains the same batches, to the same tensors. Written in
    on_train_epoch_end, Lightning resumed it by training one batch of the next epoch as the old epoch's
    last and then restarting that epoch, and the task diverged."""
    import torch
    from safetensors.torch import load_file

    matrix, runs = reference_matrix
    run_dir = killed_at_task_2_checkpoint(tmp_path, "e")
    done = launch(tmp_path, *THREE, "run_id=e", "resume=true")
    assert "task 2/3 demo_parity: continuing from its checkpoint" in done.stdout
    for task in ("02-demo_parity", "03-demo_continent"):
        ours, reference = (load_file(str(root / "tasks" / task / "branch.safetensors"))
                           for root in (run_dir, runs / "demo" / "a"))
        assert all(torch.equal(ours[k], reference[k]) for k in reference), task
    assert results_of(run_dir / "results.json")["matrix"] == matrix


@pytest.mark.parametrize("point", ["after_done", "during_metrics_write", "during_task_write", "during_results_write"])
def test_kill_at_a_task_boundary_then_resume(point, two_task_run, tmp_path):
    """SIGKILL right after task 1's DONE marker (before predictions.json, results.json and its
    metrics row), half-way through the metrics.csv write that holds task 1's row, inside task 1's
    staging folder, or half-way through its results.json: metrics.csv is never empty or torn, no
    half folder or file takes a final name, and the resume fills in what is missing, once."""
    faults = ("tests/support/faults.py", point, "0")
    killed = launch(tmp_path, *TWO, "run_id=b", entry=faults, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    run_dir = tmp_path / "demo" / "b"
    task1 = run_dir / "tasks" / "01-demo_colour"
    if point == "during_task_write":
        assert not task1.exists() and list(task1.parent.glob(".01-demo_colour.*.staging"))
    else:
        assert (task1 / "DONE").is_file()
    if point == "after_done":
        assert not (run_dir / "predictions.json").exists()
    elif point == "during_metrics_write":
        assert list(run_dir.glob(".metrics.csv.*.tmp")), "the kill should land inside the write"
    elif point == "during_results_write":
        assert list(run_dir.glob(".results.json.*.tmp")) and not (run_dir / "results.json").exists()
    if (run_dir / "metrics.csv").exists():  # never empty, never a torn row
        lines = (run_dir / "metrics.csv").read_text().splitlines()
        assert lines and all(len(next(csv.reader([line]))) == len(lines[0].split(",")) for line in lines)
        assert "1" not in cl_rows(run_dir)
    done = launch(tmp_path, *TWO, "run_id=b", "resume=true")
    assert ("task 1/2 demo_colour: finished earlier, restored" in done.stdout) == (point != "during_task_write")
    assert not list(run_dir.rglob(".*.tmp")) and not list(run_dir.rglob(".*.staging"))  # the kill's leftovers are gone
    assert cl_rows(run_dir) == ["1", "2"]
    with open(run_dir / "metrics.csv", newline="") as file:  # the global step continues from task 1's
        assert [r["global_step"] for r in csv.DictReader(file) if r.get("cl/task")] == ["8", "16"]
    assert results_of(run_dir / "results.json")["matrix"] == results_of(two_task_run[0])["matrix"]
    assert (run_dir / "predictions.json").read_text() == (run_dir / "tasks" / "02-demo_parity" /
                                                         "predictions.json").read_text()


def test_one_task_stream(tmp_path):
    done = launch(tmp_path, "benchmark.num_tasks=1", "trainer.max_steps=4", "run_id=one")
    results = results_of(Path(done.stdout.strip().splitlines()[-1]))
    assert results["status"] == "finished" and len(results["matrix"]) == 1 and len(results["matrix"][0]) == 1
    assert results["AP"] == results["matrix"][0][0] and (tmp_path / "demo" / "one" / "plots" / "matrix.png").is_file()


@pytest.mark.parametrize("damage", ["truncate memory", "delete meta"])
def test_resume_refuses_a_damaged_task_folder_and_keeps_results(damage, two_task_run, tmp_path):
    run_dir = tmp_path / "demo" / "r1"
    shutil.copytree(two_task_run[0].parent, run_dir)
    task = run_dir / "tasks" / "01-demo_colour"
    if damage == "truncate memory":
        target = task / "memory.safetensors"
        target.write_bytes(target.read_bytes()[:-64])
    else:
        target = task / "meta.json"
        target.unlink()
    before = (run_dir / "results.json").read_bytes()
    config = (run_dir / "config.yaml").read_bytes()
    done = launch(tmp_path, *TWO, "run_id=r1", "resume=true", check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [done.stderr.strip().splitlines()[-1]] and "Traceback" not in done.stderr
    assert errors[0].startswith(f"error: {target}: ")
    assert (run_dir / "results.json").read_bytes() == before  # a failed resume rewrites nothing
    assert (run_dir / "config.yaml").read_bytes() == config  # config.yaml included (it said resume: true)


def test_resume_with_another_config_is_refused(reference_matrix):
    _, runs = reference_matrix
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, f"paths.runs_dir={runs}", *THREE, "run_id=a",
           "resume=true", "lora.rank=4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "lora.rank: 8 -> 4" in done.stdout + done.stderr


# -- the reference runs (docs/method.md, "Baselines") --------------------------------------------------------
REFERENCE = ("benchmark.num_tasks=2", "trainer.max_steps=30")


def test_single_task_reference_then_fwt_of_a_continual_run(tmp_path):
    done = launch(tmp_path, *REFERENCE, "method=single_task", "run_id=st")
    single = results_of(Path(done.stdout.strip().splitlines()[-1]))
    assert single["status"] == "finished" and single["run_kind"] == "single_task"
    assert "Only the diagonal" in single["note"]
    assert single["FT"] is None and single["BWT"] is None and single["FWT"] is None
    S = [single["matrix"][j][j] for j in range(2)]
    assert single["AP"] == pytest.approx(sum(S) / 2)
    metrics_line = next(line for line in done.stdout.splitlines() if line.startswith("AP "))
    assert "FT" not in metrics_line  # the summary names no FT for it

    done = launch(tmp_path, *REFERENCE, "method=inclora", f"metrics.single_task_run={tmp_path / 'demo' / 'st'}",
                  "run_id=inc")
    results = results_of(Path(done.stdout.strip().splitlines()[-1]))
    R = results["matrix"]
    assert results["run_kind"] == "continual" and results["tasks"] == single["tasks"]
    assert results["FWT"] == pytest.approx(sum(R[j][j] - S[j] for j in range(2)) / 2)
    assert results["single_task_run"] == str(tmp_path / "demo" / "st")


def test_multi_task_reference_joint_fit_and_resume(tmp_path):
    import gainlora

    done = launch(tmp_path, "benchmark.num_tasks=2", "trainer.max_steps=6", "method=multi_task", "run_id=mt")
    assert "joint fit on all 2 tasks: start" in done.stdout
    assert "joint fit on all 2 tasks: 12 steps" in done.stdout  # max_steps per task x 2 tasks, one fit
    assert "all tasks jointly" in done.stdout  # the summary's one row
    run_dir = tmp_path / "demo" / "mt"
    results = results_of(run_dir / "results.json")
    assert results["status"] == "finished" and results["run_kind"] == "multi_task"
    (row,) = results["matrix"]
    assert len(row) == 2 and results["AP"] == pytest.approx(sum(row) / 2)
    assert all(results[k] is None for k in ("FT", "BWT", "BWT_ref", "FWT"))
    assert (run_dir / "plots" / "scores.png").is_file() and (run_dir / "tasks" / "02-joint" / "DONE").is_file()
    with open(run_dir / "metrics.csv", newline="") as file:
        logged = [r for r in csv.DictReader(file) if r.get("cl/task")]
    assert [r["cl/task"] for r in logged] == ["2"] and float(logged[0]["cl/AP"]) == pytest.approx(results["AP"])

    again = launch(tmp_path, "benchmark.num_tasks=2", "trainer.max_steps=6", "method=multi_task", "run_id=mt",
                   "resume=true")
    assert "finished earlier, restored" in again.stdout and "joint fit on all 2 tasks: start" not in again.stdout
    assert results_of(run_dir / "results.json")["matrix"] == results["matrix"]

    recorded = json.loads((run_dir / "predictions.json").read_text())
    model = gainlora.load_run(run_dir)
    assert model.tasks == results["tasks"]
    assert model.generate([r["source"] for r in recorded], batch_size=5) == [r["prediction"] for r in recorded]
