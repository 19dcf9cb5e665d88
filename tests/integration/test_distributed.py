"""Two CPU processes, DDP and DeepSpeed ZeRO-2, against the same run in one process.

Each run launches the entry point in a subprocess (a multi-process strategy must never start inside
pytest: rank 1 would re-run pytest). DeepSpeed goes through the test-only shim in tests/support,
which lets Lightning's DeepSpeedStrategy run over gloo on CPU processes.

What must hold sharded as in one process:
- the gate invariants: the new gate's key stays orthogonal to the old tasks' p2 span (under ZeRO the
  projection must write DeepSpeed's fp32 master copy, or the next step undoes it);
- the same global batches (the train sampler shards one shared permutation), hence close weights
  and a close accuracy matrix;
- every test example scored exactly once, and predictions.json holding all of them.
The loss is one token mean over the global batch on any number of devices (gainlora.model.loss):
``test_token_mean_makes_devices_agree`` trains a few steps on answers of unequal lengths and finds
the one-process weights to 1e-5. The demo runs below agree less closely for another reason: 60
float32 steps on the random-init tiny T5 are chaotic (a 1e-7 relative change of the initial
weights moves the trained branch by ~27% after 48 steps), so summation-order rounding grows too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
N_TEST = 25  # odd per-task counts: the evaluation shards need padding rows
BASE = ["experiment=demo", "benchmark.num_tasks=2", "benchmark.n_train=128", "benchmark.n_val=8",
        f"benchmark.n_test={N_TEST}", "trainer.max_steps=60", "data.global_batch_size=32",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5"]
TWO_CPUS = ["trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"]
RUNS = {
    "single": ["data.batch_size=32"],
    "ddp": ["strategy=ddp", *TWO_CPUS],
    "deepspeed": ["strategy=deepspeed_stage_2", "strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy", *TWO_CPUS],
}
TASKS = ("01-demo_colour", "02-demo_parity")

pytestmark = pytest.mark.slow


def launch(runs: Path, name: str) -> Path:
    """Run one configuration; its whole output is kept in <runs>/<name>-<attempt>.log.

    A failed launch is retried once, in a fresh run directory, and the failure is reported as a
    warning with its log: one full-suite run saw a launch of this fixture exit non-zero, and seven
    later runs did not reproduce it (a rendezvous port race is suspected). A deterministic failure
    fails both attempts.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT / "tests" / "support"),
           "GAINLORA_TRUSTED_MODULES": "cpu_deepspeed"}  # the run may name the CPU shim strategy
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "gainlora.run", *BASE, *RUNS[name], f"paths.runs_dir={runs}",
               f"run_id={name}" if attempt == 1 else f"run_id={name}-retry"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = runs / f"{name}-{attempt}.log"
        log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        if done.returncode == 0:
            return Path(done.stdout.strip().splitlines()[-1]).parent
        if attempt == 1:
            warnings.warn(f"{name} launch failed (exit {done.returncode}), retrying; log: {log}\n"
                          + done.stderr[-2000:], stacklevel=1)
    raise AssertionError(f"{name} failed twice; log: {log}\n" + done.stdout[-3000:] + done.stderr[-3000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("runs")
    return {name: launch(root, name) for name in RUNS}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def tensors(run: Path, task: str, kind: str) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(run / "tasks" / task / f"{kind}.safetensors").items()}


def delta_w(run: Path, task: str) -> dict[str, torch.Tensor]:
    """Each layer's B A: what the branch adds, free of the sign and basis freedom of A and B."""
    branch = tensors(run, task, "branch")
    return {k[: -len(".A")]: branch[k[: -len(".A")] + ".B"] @ v for k, v in branch.items() if k.endswith(".A")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", ["single", "ddp", "deepspeed"])
def test_new_gate_key_stays_orthogonal_to_old_task_span(runs, name: str) -> None:
    memory = tensors(runs[name], TASKS[0], "memory")["gate.key"]  # M3 after task 1: what task 2 obeyed
    key = tensors(runs[name], TASKS[1], "gate")["key"]
    assert memory.shape[1] >= 1
    assert (memory.T @ key).norm() / key.norm() < 1e-5


@pytest.mark.parametrize("name", ["ddp", "deepspeed"])
def test_sharded_run_matches_the_single_process_run(runs, name: str) -> None:
    single, sharded = results(runs["single"]), results(runs[name])
    assert sharded["status"] == "finished" and sharded["tasks"] == single["tasks"]
    for a, b in zip(single["matrix"], sharded["matrix"]):
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= 16.0 + 1e-9, (single["matrix"], sharded["matrix"])  # 4 of 25 examples
    # The first task's update: same global batches and loss, so close weights (rounding, amplified).
    ref = delta_w(runs["single"], TASKS[0])
    got = delta_w(runs[name], TASKS[0])
    assert max(relative(got[k], ref[k]) for k in ref) < 0.05  # measured 0.009 and 0.028
    # Gate 1 trained unconstrained in both; its projection-free drift must agree as well.
    gate_ref, gate = tensors(runs["single"], TASKS[0], "gate"), tensors(runs[name], TASKS[0], "gate")
    assert max(relative(gate[k], gate_ref[k]) for k in gate_ref) < 5e-3  # measured 2.6e-4 and 5.0e-4


def test_ddp_and_deepspeed_agree_closely(runs) -> None:
    """Same micro-batches per rank, same reduction: only summation order can differ."""
    ddp, ds = delta_w(runs["ddp"], TASKS[0]), delta_w(runs["deepspeed"], TASKS[0])
    assert max(relative(ds[k], ddp[k]) for k in ddp) < 1e-6  # measured 0.0


@pytest.mark.parametrize("name", ["ddp", "deepspeed"])
def test_every_test_example_is_scored_once(runs, name: str) -> None:
    sharded = results(runs[name])
    assert sharded["derived"]["world_size"] == 2 and sharded["derived"]["global_batch"] == 32
    predictions = json.loads((runs[name] / "predictions.json").read_text())
    assert [p["task"] for p in predictions] == [0] * N_TEST + [1] * N_TEST  # no padding row, none lost
    single = json.loads((runs["single"] / "predictions.json").read_text())
    assert [p["source"] for p in predictions] == [p["source"] for p in single]  # dataset order


def train_sharded(tmp_path: Path, backbone: Path, strategy: str, devices: int, batch: int, accumulate: int) -> dict:
    out = tmp_path / f"{strategy}-{devices}x{batch}x{accumulate}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "tests" / "support" / "train_sharded.py"), str(backbone), str(out), strategy,
           str(devices), str(batch), str(accumulate), "8"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(out)


@pytest.fixture(scope="module")
def single_weights(tmp_path_factory, tiny_t5_path: Path) -> dict:
    return train_sharded(tmp_path_factory.mktemp("single"), tiny_t5_path, "auto", 1, 8, 1)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_token_mean_makes_devices_agree(tmp_path: Path, tiny_t5_path: Path, single_weights: dict,
                                        strategy: str) -> None:
    """Two processes of batch 4 give the weights of one process of batch 8, on answers of 1-5 words.
    With a per-rank token mean instead the branch differs by 11% (measured by disabling it)."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    single = single_weights
    sharded = train_sharded(tmp_path, tiny_t5_path, strategy, 2, 4, 1)
    assert single.keys() == sharded.keys()
    assert max(relative(sharded[k].double(), single[k].double()) for k in single) <= 1e-5  # measured 1.4e-6
