"""End to end: the entry point on a tiny backbone, the run-directory contract, load_run,
determinism, and resuming after a hard kill."""
from __future__ import annotations

import csv
import json
import os
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


def launch(runs: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, f"paths.runs_dir={runs}", *overrides]
    # One thread: a multi-threaded BLAS may split work by the machine's load, and an untrained tiny
    # model's greedy answers flip on such last-bit differences.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def results_of(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    done = launch(runs, "benchmark.num_tasks=2", "trainer.max_steps=8", "trainer.log_every_n_steps=2", "run_id=r1")
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

    run_dir = two_task_run[0].parent
    recorded = json.loads((run_dir / "predictions.json").read_text())
    model = gainlora.load_run(run_dir)
    assert model.tasks == results_of(two_task_run[0])["tasks"]
    again = model.generate([r["source"] for r in recorded], batch_size=7)  # other batching on purpose
    assert again == [r["prediction"] for r in recorded]


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


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
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
    if sig == signal.SIGTERM:  # a clean stop: says so, exits 143, records the state
        assert proc.returncode == 143, rest[-2000:]
        assert "resume with resume=true" in rest
        assert results_of(run_dir / "results.json")["status"] == "interrupted"
    assert (run_dir / "tasks" / "01-demo_colour" / "DONE").is_file()
    assert not list((run_dir / "tasks").glob("02-*/DONE")), "task 2 finished before the kill"
    done = launch(tmp_path, *THREE, "run_id=k", "resume=true")
    assert "finished earlier, restored" in done.stdout
    with open(run_dir / "metrics.csv", newline="") as file:
        logged_tasks = {row["cl/task"] for row in csv.DictReader(file) if row.get("cl/task")}
    assert logged_tasks == {"1", "2", "3"}  # task 1's rows, written before the kill, survived
    assert results_of(run_dir / "results.json")["matrix"] == matrix


def test_resume_inside_a_task_from_its_checkpoint(reference_matrix, tmp_path):
    """SIGKILL right after task 2's first epoch-end checkpoint: the resumed run continues task 2
    from that checkpoint (not from its start) and still gives the uninterrupted matrix."""
    matrix, _ = reference_matrix
    proc = launch(tmp_path, *THREE, "run_id=c", wait=False)
    run_dir = tmp_path / "demo" / "c"
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("02-*/last.ckpt")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint of task 2 was written"
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    assert not list((run_dir / "tasks").glob("02-*/DONE")), "task 2 finished before the kill"
    assert not (run_dir / "checkpoints" / "01-demo_colour").exists()  # removed once task 1 was done
    done = launch(tmp_path, *THREE, "run_id=c", "resume=true")
    assert "task 2/3 demo_parity: continuing from its checkpoint checkpoints/02-demo_parity/last.ckpt" in done.stdout
    assert results_of(run_dir / "results.json")["matrix"] == matrix
    assert not (run_dir / "checkpoints").exists()  # finished: no checkpoint left behind


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
    assert "FT" not in done.stdout.strip().splitlines()[-2]  # the summary line names no FT for it

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
    assert "`max_steps=12` reached" in done.stdout + done.stderr  # max_steps per task x 2 tasks, one fit
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
