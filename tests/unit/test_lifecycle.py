"""The task lifecycle on a tiny T5: begin_task / end_task, the forgetting-metrics callback, the
observers (and what they regenerate on resume), one-task streams, resume inside a task from a
mid-epoch checkpoint, and a failed resume that leaves results.json alone."""
from __future__ import annotations

import csv
import functools
import json
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from gainlora.artifacts import ArtifactError, RunDir
from gainlora.callbacks.interrupt import StopFlag, TaskInterrupted, resume_command
from gainlora.csv_logger import RunCSVLogger, logged_tasks, read_rows
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.loop import ContinualLoop
from gainlora.methods import GainLoRA, IncLoRA, InfLoRA, SAPTLoRA
from gainlora.metrics import TaskScores
from gainlora.model.module import ContinualLM
from gainlora.observers import LoggerMetrics, TaskEnd, TaskObserver

TASKS = ("demo_colour", "demo_parity")
N_TRAIN, BATCH, STEPS = 24, 8, 6  # 3 batches an epoch: steps 1..6 cover two epochs


class Recorder(TaskObserver):
    def __init__(self) -> None:
        self.events: list[tuple[int, bool, int]] = []  # (task, restored, matrix rows at the time)
        self.run_end: list[str] = []

    def on_task_end(self, end: TaskEnd) -> None:
        self.events.append((end.task, end.restored, len(end.results["matrix"])))

    def on_run_end(self, results: dict) -> None:
        self.run_end.append(results["status"])


class Crash(L.Callback):
    """Stands for a kill: raises once training reaches ``step``."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step = task, step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.current_task == self.task and trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def make_loop(backbone, run_dir: Path, make_trainer, *, names=TASKS, method=None, extra=(), dropout=0.0,
              **kwargs) -> ContinualLoop:
    torch.manual_seed(0)
    method = method or IncLoRA()
    module = ContinualLM(backbone, rank=4, alpha=32, dropout=dropout, gates=method.gate_spec, task_names=list(names),
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    tasks = [make_demo_task(name, n_train=N_TRAIN, n_val=0, n_test=4) for name in names]
    dm = TaskStreamDataModule(tasks, Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=BATCH,
                              eval_batch_size=8)

    def factory(t, callbacks, scale=1):
        return make_trainer(STEPS * scale, [*callbacks, *extra])

    info = {"experiment": "unit", "method": method.name, "benchmark": "demo", "order": 1}
    return ContinualLoop(module=module, datamodule=dm, method=method, run_dir=RunDir(run_dir), make_trainer=factory,
                         info=info, progress_bar=False, **kwargs)


def branch_state(loop: ContinualLoop) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}.{k}": t.detach().clone() for name, layer in loop.module.adapted.items()
            for i in range(layer.num_branches) for k, t in zip("AB", layer.branch(i))}


def test_task_scores_keep_one_dimension_for_one_task() -> None:
    scores = TaskScores(1)
    scores.update(["a"], [["a"]], [0], "exact_match")
    assert scores.compute().shape == (1,) and scores.compute()[:1].tolist() == [100.0]


def test_one_task_stream_trains_tests_and_writes_a_1x1_matrix(t5_backbone, make_trainer, tmp_path) -> None:
    results = make_loop(t5_backbone(), tmp_path, make_trainer, names=TASKS[:1]).run()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "finished" and len(on_disk["matrix"]) == 1 and len(on_disk["matrix"][0]) == 1
    assert on_disk["matrix"] == results["matrix"] and on_disk["AP"] == on_disk["matrix"][0][0]
    assert on_disk["FT"] == on_disk["BWT"] == 0.0
    assert (tmp_path / "tasks" / "01-demo_colour" / "DONE").is_file()


def test_begin_task_tells_the_module_its_task_and_regularizer(t5_backbone, make_trainer, tmp_path) -> None:
    loop = make_loop(t5_backbone(), tmp_path, make_trainer)
    loop.method.setup(loop.module, 2)
    loop.begin_task(1)
    assert loop.module.current_task == 1 and loop.datamodule.task == 1 and loop.module.num_branches == 1
    assert loop.module.regularizer() is None  # IncLoRA adds no loss term; the method's hook is wired


def test_observers_see_each_task_once_and_restored_tasks_on_resume(t5_backbone, make_trainer, tmp_path) -> None:
    first = Recorder()
    results = make_loop(t5_backbone(), tmp_path, make_trainer, observers=[first]).run()
    assert first.events == [(0, False, 1), (1, False, 2)] and first.run_end == ["finished"]
    # The forgetting callback filled the matrix from each task's test: row t after task t.
    assert len(results["matrix"][0]) == 2 and results["matrix"][0][1] is None

    def no_training(*args):
        raise AssertionError("a finished task must not be trained again")

    again = Recorder()
    resumed = make_loop(t5_backbone(), tmp_path, no_training, observers=[again]).run()
    assert again.events == [(0, True, 2), (1, True, 2)]  # announced after both are verified
    assert resumed["matrix"] == results["matrix"]


def test_resume_fills_in_what_a_kill_after_done_left_missing(t5_backbone, make_trainer, tmp_path) -> None:
    """Task 2's DONE was written, then the process died before predictions.json and its
    metrics.csv row: the resume writes both, once."""
    logger = RunCSVLogger(str(tmp_path))
    make_loop(t5_backbone(), tmp_path, make_trainer, observers=[LoggerMetrics([logger])]).run()
    csv_path = tmp_path / "metrics.csv"
    assert logged_tasks(csv_path) == {1, 2}
    predictions = (tmp_path / "predictions.json").read_text()
    rows = read_rows(csv_path)
    (tmp_path / "predictions.json").unlink()
    kept = [r for r in rows if r.get("cl/task") != "2"]
    with open(csv_path, "w", newline="") as file:  # metrics.csv as it was before task 2's row
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)

    def no_training(*args):
        raise AssertionError("a finished task must not be trained again")

    logger = RunCSVLogger(str(tmp_path))
    make_loop(t5_backbone(), tmp_path, no_training, observers=[LoggerMetrics([logger])]).run()
    assert (tmp_path / "predictions.json").read_text() == predictions
    after = read_rows(csv_path)
    assert [r["cl/task"] for r in after if r.get("cl/task")] == ["1", "2"]  # task 1's row not repeated
    assert after[-1]["cl/AP"] == [r for r in rows if r.get("cl/task") == "2"][0]["cl/AP"]


def test_failed_resume_leaves_results_json_untouched(t5_backbone, make_trainer, tmp_path) -> None:
    make_loop(t5_backbone(), tmp_path, make_trainer).run()
    before = (tmp_path / "results.json").read_bytes()
    branch = tmp_path / "tasks" / "02-demo_parity" / "branch.safetensors"
    branch.write_bytes(branch.read_bytes()[:-100])  # truncated
    loop = make_loop(t5_backbone(), tmp_path, make_trainer)
    with pytest.raises(ArtifactError, match="02-demo_parity/branch.safetensors: does not match its checksum"):
        loop.run()
    loop.finish("failed: ArtifactError")  # what the entry point does on any failure
    assert (tmp_path / "results.json").read_bytes() == before


def test_a_missing_done_before_a_finished_task_is_refused(t5_backbone, make_trainer, tmp_path) -> None:
    make_loop(t5_backbone(), tmp_path, make_trainer).run()
    (tmp_path / "tasks" / "01-demo_colour" / "DONE").unlink()
    with pytest.raises(ArtifactError, match="01-demo_colour/DONE: missing, but the later task 02-demo_parity"):
        make_loop(t5_backbone(), tmp_path, make_trainer).run()


@pytest.mark.parametrize("method", [IncLoRA, lambda: GainLoRA(InfLoRA(), hidden=16), lambda: SAPTLoRA(hidden=16)],
                         ids=["inclora", "gainlora", "sapt_lora"])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(method, t5_backbone, make_trainer, tmp_path) -> None:
    """Task 2 dies at step 5, after the step-4 checkpoint (epoch 1, batch 1 of 3): the resumed
    task continues from that batch and ends exactly where the uninterrupted run did (LoRA dropout
    on: the RNG state is restored too)."""
    cadence, common = {"every_n_train_steps": 2}, {"make_trainer": make_trainer, "dropout": 0.3}
    reference = make_loop(t5_backbone(), tmp_path / "ref", method=method(), checkpoint=cadence, **common)
    expected = reference.run()
    crashed = make_loop(t5_backbone(), tmp_path / "run", method=method(), checkpoint=cadence, **common,
                        extra=[Crash(task=1, step=5)])
    with pytest.raises(RuntimeError, match="killed at step 5"):
        crashed.run()
    checkpoint = tmp_path / "run" / "checkpoints" / "02-demo_parity" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 4
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    resumed = make_loop(t5_backbone(), tmp_path / "run", method=method(), checkpoint=cadence, **common)
    assert resumed.run()["matrix"] == expected["matrix"]
    reference_state, resumed_state = branch_state(reference), branch_state(resumed)
    assert reference_state.keys() == resumed_state.keys()
    assert all(torch.equal(reference_state[k], resumed_state[k]) for k in reference_state)
    if reference.module.gates is not None:  # gates and keys; SAPT's shared query network
        gates, again = reference.module.gates.state_dict(), resumed.module.gates.state_dict()
        assert gates.keys() == again.keys() and all(torch.equal(gates[k], again[k]) for k in gates)
    assert not checkpoint.exists()


def test_stop_flag_exit_codes_and_resume_command() -> None:
    flag = StopFlag()
    assert not flag.requested
    flag._handle(signal.SIGINT, None)
    assert flag.requested and flag.exit_code == 130
    with pytest.raises(TaskInterrupted, match="twice"):  # Ctrl-C twice: stop at once
        flag._handle(signal.SIGINT, None)
    term = StopFlag()
    term._handle(signal.SIGTERM, None)
    assert term.exit_code == 143
    command = resume_command("r1", ["experiment=demo", "run_id=old", "lora.rank=4", "resume=false"])
    assert command == "python -m gainlora.run experiment=demo lora.rank=4 resume=true run_id=r1"


def test_lightning_s_sigterm_exception_ends_as_an_interruption(tmp_path, capsys) -> None:
    """Lightning raises SIGTERMException (a SystemExit without a code) when SIGTERM lands in its
    loops: the run must end `interrupted` with exit 143, not exit 0 as `failed`."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gainlora.artifacts import RunDir
    from gainlora.callbacks.interrupt import StopFlag
    from gainlora.run import run_loop

    class Loop:
        is_main, statuses = True, []

        def run(self):
            raise SIGTERMException

        def finish(self, status):
            self.statuses.append(status)

    stop, loop = StopFlag(), Loop()
    stop.signal = signal.SIGTERM
    with pytest.raises(SystemExit) as stopped:
        run_loop(loop, RunDir(tmp_path / "r"), [], stop)
    assert stopped.value.code == 143 and loop.statuses == ["interrupted"]
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped by SIGTERM; finished tasks are saved; resume with:\n")
    assert "resume=true run_id=r" in err


def test_an_in_task_checkpoint_that_does_not_fit_the_reopened_task_is_named(t5_backbone, make_trainer, tmp_path):
    """A readable last.ckpt of other tensors (another rank, another run) or no Lightning checkpoint at all,
    or a file where the checkpoints folder goes: one error naming it before fit (each was a traceback
    from inside trainer.fit, or mid-task when the first checkpoint was written)."""
    import re
    import shutil

    loop = make_loop(t5_backbone(), tmp_path, make_trainer, checkpoint={"every_n_train_steps": 2})
    loop.method.setup(loop.module, 2)
    loop.begin_task(0)
    last = loop.run_dir.checkpoint_dir(0, "demo_colour") / "last.ckpt"
    last.parent.mkdir(parents=True)
    trains = {n: p.detach().clone() for n, p in loop.module.named_parameters() if p.requires_grad}
    sound = {"state_dict": trains, "loops": {}, "global_step": 2, "pytorch-lightning_version": "2.6.0"}
    torch.save(sound, last)
    assert loop.in_task_checkpoint(0, "demo_colour")[1] == last
    first = next(iter(trains))
    for saved, message in (({**sound, "state_dict": {**trains, first: torch.zeros(3, 3)}}, "its tensors are not those "
                            "task 1 trains (names or shapes differ); delete it to restart task 1"),
                           ({"hello": torch.zeros(2)}, "not a Lightning checkpoint of this run")):
        torch.save(saved, last)
        with pytest.raises(ArtifactError, match=f"^{re.escape(str(last))}: {re.escape(message)}"):
            loop.in_task_checkpoint(0, "demo_colour")
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(tmp_path / 'checkpoints'))}: not a folder"):
        loop.in_task_checkpoint(0, "demo_colour")
