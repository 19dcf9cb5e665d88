"""The continual loop: for each task, open branches/gates, fit with a fresh Trainer, test on every
seen task, grow memories, write the task's artifacts. One module and datamodule live throughout.
A method with ``joint_training`` (the multi-task reference) gets one fit on every task's data instead.

A fresh Trainer per task is deliberate: reusing one across fits silently skips training
(Lightning #9636, #12789), and Lightning has no notion of tasks, so this loop drives the method's
task hooks itself.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from gainlora.artifacts import RunDir, write_json
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.methods.base import Method
from gainlora.metrics import RUN_KINDS, run_metrics
from gainlora.model.module import ContinualLM
from gainlora.report import plot_run

log = logging.getLogger(__name__)
# make_trainer(task, callbacks, steps_scale): steps_scale multiplies a positive trainer.max_steps (the
# per-task budget) for a fit that covers several tasks' data.
TrainerFactory = Callable[[int, list[L.Callback], int], L.Trainer]
JOINT = "joint"  # the task-directory name of a joint fit: tasks/<T>-joint


def fits(method: Method, names: list[str]) -> list[tuple[int, str]]:
    """The run's fits as (task index, name): one per task in order; for joint training one fit on
    every task's data, indexed by the last task (after it, tasks 0..T-1 are learned)."""
    if method.joint_training:
        return [(len(names) - 1, JOINT)]
    return list(enumerate(names))


class TaskProgressBar(TQDMProgressBar):
    """Step bars that say which task of the sequence is training."""

    def __init__(self, task: int, num_tasks: int, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = f"Task {task + 1}/{num_tasks} {name}"

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.label} · epoch {trainer.current_epoch}")


# -- artifacts of one task ----------------------------------------------------------------------------
def task_tensors(module: ContinualLM, method: Method, task: int) -> dict[str, dict[str, torch.Tensor]]:
    """What task ``task`` added: its branch (every layer), its gate, and the memories after it."""
    index = method.branch_for_task(task)
    branch = {}
    for name, layer in module.adapted.items():
        A, B = layer.branch(index)
        branch[f"{name}.A"], branch[f"{name}.B"] = A.detach().float(), B.detach().float()
    gate = {k: v.detach().float() for k, v in module.gates.gate(task).items()} if module.gates is not None else {}
    return {"branch": branch, "gate": gate, "memory": method.memory_tensors()}


def restore_task(module: ContinualLM, method: Method, task: int, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Re-open task ``task``'s branch and gate exactly as they were saved."""
    check_shapes(module, files, task)
    branch = files["branch"]
    init = {name: (branch[f"{name}.A"], branch[f"{name}.B"]) for name in module.adapted}
    if method.new_branch_per_task or module.num_branches == 0:
        module.add_branch(init)
    else:  # a single branch trained through every task (SeqLoRA): take its latest state
        with torch.no_grad():
            for name, layer in module.adapted.items():
                layer.lora_A.copy_(init[name][0])
                layer.lora_B.copy_(init[name][1])
    if module.gates is not None:
        gate = files["gate"]
        module.gates.add_gate(copy_previous=False, G1=gate["G1"], G2=gate["G2"], key=gate["key"])
    if files.get("memory"):
        method.load_memory_tensors(files["memory"])


class TaskInterrupted(RuntimeError):
    """SIGTERM (or Ctrl-C) arrived during a task: it is not marked done, so a resume redoes it."""


class StopFlag:
    """Set by SIGTERM. Lightning's own SIGTERM handler calls ours too and ends fit() early."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class ArtifactError(ValueError):
    """A saved artifact does not fit the model being rebuilt (e.g. another rank or backbone)."""


def check_shapes(module: ContinualLM, files: dict[str, dict[str, torch.Tensor]], task: int) -> None:
    expected = {}
    for name, layer in module.adapted.items():
        expected[f"{name}.A"] = (layer.rank, layer.in_features)
        expected[f"{name}.B"] = (layer.out_features, layer.rank)
    branch = files.get("branch", {})
    if set(branch) != set(expected):
        missing = sorted(set(expected) - set(branch))[:3]
        raise ArtifactError(f"task {task + 1} branch.safetensors does not match the model's adapted layers "
                            f"(missing e.g. {missing}); was the run made with another backbone?")
    for key, shape in expected.items():
        if tuple(branch[key].shape) != shape:
            raise ArtifactError(f"task {task + 1} branch.safetensors: {key} has shape {tuple(branch[key].shape)}, "
                                f"the model expects {shape} (lora.rank or backbone changed?)")
    if module.gates is not None:
        gate = files.get("gate", {})
        want = {"G1": (module.gates.hidden, module.gates.dim), "G2": (module.gates.dim, module.gates.hidden),
                "key": (module.gates.dim,)}
        for key, shape in want.items():
            if key not in gate or tuple(gate[key].shape) != shape:
                raise ArtifactError(f"task {task + 1} gate.safetensors: {key} missing or not of shape {shape}")


@dataclass
class ContinualLoop:
    module: ContinualLM
    datamodule: TaskStreamDataModule
    method: Method
    run_dir: RunDir
    make_trainer: TrainerFactory
    info: dict  # experiment, method, benchmark, order, metric, seed, selection: copied to results.json
    seed: int = 0
    progress_bar: bool = True
    is_main: bool = True  # global rank 0 writes the run directory; other ranks only compute
    stop: StopFlag = field(default_factory=StopFlag)
    on_task_end: Callable[[int, dict], None] | None = None  # e.g. W&B logging of the CL metrics
    matrix: list[list[float | None]] = field(default_factory=list)
    checkpoint: dict | None = None  # in-task checkpoints: every_n_epochs / every_n_train_steps
    single_task: list[float] | None = None  # S[j] from a single-task reference run: FWT

    def say(self, message: str) -> None:
        if self.is_main:  # one line per event, not one per rank
            print(f"[gainlora] {message}", flush=True)

    def label(self, t: int, name: str) -> str:
        n = len(self.task_names)
        return f"joint fit on all {n} tasks" if self.method.joint_training else f"task {t + 1}/{n} {name}"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.datamodule.tasks]

    def run(self) -> dict:
        names, started = self.task_names, time.time()
        self.method.setup(self.module, len(names))
        resumed_time = 0.0
        for t, name in fits(self.method, names):
            if self.stop.requested:  # SIGTERM between tasks: stop at this boundary
                raise TaskInterrupted(f"stopped before task {t + 1} ({name}); finished tasks are saved, "
                                      "resume with resume=true")
            if self.run_dir.is_done(t, name):
                files, meta = self.run_dir.load_task(t, name)
                restore_task(self.module, self.method, t, files)
                self.matrix.append(meta["row"] + [None] * (len(names) - t - 1))
                resumed_time += meta.get("wall_time_s", 0.0)
                self.say(f"{self.label(t, name)}: finished earlier, restored")
                continue
            task_started = time.time()
            row = self.train_task(t, name)
            self.matrix.append(row + [None] * (len(names) - t - 1))
            meta = {"task": t, "name": name, "row": row, "wall_time_s": time.time() - task_started}
            if self.is_main:
                self.run_dir.save_task(t, name, task_tensors(self.module, self.method, t), meta)
                write_json(self.run_dir.root / "predictions.json", self.module.predictions)
                shutil.rmtree(self.run_dir.checkpoint_dir(t, name), ignore_errors=True)  # done: not needed
            results = self.write_results(status="running", wall_time=resumed_time + time.time() - started)
            if self.on_task_end is not None:
                self.on_task_end(t, results)
        if self.is_main and self.checkpoint:  # every task's checkpoints went when it was done
            with contextlib.suppress(OSError):
                (self.run_dir.root / "checkpoints").rmdir()
        return self.write_results(status="finished", wall_time=resumed_time + time.time() - started)

    def train_task(self, t: int, name: str) -> list[float]:
        n = len(self.task_names)
        joint = self.method.joint_training
        label = self.label(t, name)
        self.say(f"{label}: start")
        L.seed_everything(self.seed + t, workers=True, verbose=False)  # resume reproduces each task
        self.datamodule.set_task(t, joint=joint)
        self.module.current_task = t
        self.method.on_task_start(self.module, t, self.datamodule.feature_batches)
        self.module.regularizer = lambda: self.method.regularizer(self.module)
        callbacks = [TaskProgressBar(t, n, name)] if self.progress_bar else []
        callbacks += self.method.callbacks()
        saver, last = self.in_task_checkpoint(t, name)
        trainer = self.make_trainer(t, callbacks + saver, len(self.datamodule.fit_tasks))
        if last is not None:
            self.say(f"{label}: continuing from its checkpoint {last.relative_to(self.run_dir.root)}")
        if not self.stop.requested:
            # weights_only: a checkpoint is tensors, numbers and strings; nothing in it runs code.
            trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=last, weights_only=True)
        if self.stop.requested or trainer.received_sigterm or trainer.interrupted:
            raise TaskInterrupted(f"task {t + 1} ({name}) was interrupted before it finished; "
                                  "finished tasks are saved, resume with resume=true")
        self.method.on_task_end(self.module, t, self.datamodule.feature_batches)
        trainer.test(self.module, datamodule=self.datamodule, verbose=False)
        row = [round(s, 4) for s in self.module.test_scores()]
        self.say(f"{label}: scores on seen tasks {row}")
        return row

    def in_task_checkpoint(self, t: int, name: str) -> tuple[list[L.Callback], Path | None]:
        """A ModelCheckpoint writing <run_dir>/checkpoints/<task>/last.ckpt, and that file if an
        interrupted attempt at this task left one (the task is re-opened exactly as before by the
        seeded task start, then the checkpoint restores what trained and the loop state)."""
        if not self.checkpoint:
            return [], None
        folder = self.run_dir.checkpoint_dir(t, name)
        steps = self.checkpoint.get("every_n_train_steps") or None
        saver = ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True, every_n_train_steps=steps,
                                every_n_epochs=None if steps else self.checkpoint.get("every_n_epochs"),
                                save_on_train_epoch_end=True, enable_version_counter=False)
        last = folder / "last.ckpt"
        return [saver], last if last.is_file() else None

    def write_results(self, *, status: str, wall_time: float) -> dict:
        names = self.task_names
        rows = [[None if v is None else float(v) for v in r] for r in self.matrix]
        kind = self.method.run_kind
        scores = (run_metrics(rows, kind, self.single_task) if rows
                  else dict.fromkeys(("AP", "FT", "BWT", "BWT_ref", "FWT", "FWT_diag")))
        results = {**self.info, "tasks": names, "run_kind": kind, "matrix": rows, **scores,
                   "wall_time_s": round(wall_time, 2), "status": status,
                   "truncated": {"sources": self.datamodule.collator.truncation.sources,
                                 "targets": self.datamodule.collator.truncation.targets}}
        if RUN_KINDS[kind]:
            results["note"] = RUN_KINDS[kind]
        if not self.is_main:
            return results
        write_json(self.run_dir.results, results)
        if rows:
            title = f"{self.info.get('experiment')} · {self.info.get('method')}"
            plot_run(rows, names, kind, self.run_dir.plots, title=title)
        return results
