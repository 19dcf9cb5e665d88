"""The continual loop: for each task ``begin_task`` (seed, select the data, tell the module its task,
the method's ``on_task_start``), fit with a fresh Trainer, then ``end_task`` (the method's
``on_task_end``, test on every seen task, write the task folder, notify the observers). One module,
datamodule, forgetting-metrics callback and list of observers live throughout. A method with
``joint_training`` (the multi-task reference) gets one fit on every task's data instead.

A fresh Trainer per task is deliberate: reusing one across fits silently skips training
(Lightning #9636, #12789), and Lightning has no notion of tasks, so this loop drives the method's
task hooks itself (docs/architecture.md, "The task lifecycle").
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from gainlora.artifacts import ArtifactError, RunDir
from gainlora.callbacks.forgetting import ForgettingMetrics
from gainlora.callbacks.in_task_checkpoint import InTaskCheckpoint, check_checkpoint
from gainlora.callbacks.interrupt import StopFlag, StopOnSignal, TaskInterrupted
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.methods.base import Method
from gainlora.model.module import ContinualLM
from gainlora.observers import PREDICTIONS, ResultsWriter, TaskEnd, TaskObserver
from gainlora.progress import TaskProgressBar, duration, sequence_eta
from gainlora.run_kinds import run_kind

__all__ = ["ArtifactError", "ContinualLoop", "StopFlag", "TaskInterrupted", "fits", "restore_task", "task_tensors"]

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


# -- artifacts of one task ----------------------------------------------------------------------------
def task_tensors(module: ContinualLM, method: Method, task: int) -> dict[str, dict[str, torch.Tensor]]:
    """What task ``task`` added: its branch (every layer), its gate, and the memories after it."""
    branch = {}
    index = method.branch_for_task(task) if method.has_branches else None  # prompt methods: no branch
    for name, layer in module.adapted.items() if index is not None else ():
        A, B = layer.branch(index)
        branch[f"{name}.A"], branch[f"{name}.B"] = A.detach().float(), B.detach().float()
    gate = {k: v.detach().float() for k, v in module.gates.gate(task).items()} if module.gates is not None else {}
    return {"branch": branch, "gate": gate, "memory": method.memory_tensors()}


def restore_task(module: ContinualLM, method: Method, task: int, files: dict[str, dict[str, torch.Tensor]],
                 folder: Path | None = None) -> None:
    """Re-open task ``task``'s branch and gate exactly as they were saved (in ``folder``: named in errors)."""
    check_shapes(module, files, task, branches=method.has_branches, folder=folder)
    if not method.has_branches:  # a prompt method: everything it learned is in its memory tensors
        method.load_memory_tensors(files.get("memory", {}))
        return
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
        module.gates.add_gate(copy_previous=False, **files["gate"])
    if files.get("memory"):
        method.load_memory_tensors(files["memory"])


def check_shapes(module: ContinualLM, files: dict[str, dict[str, torch.Tensor]], task: int,
                 branches: bool = True, folder: Path | None = None) -> None:
    def where(stem: str) -> str:
        return str(folder / f"{stem}.safetensors") if folder else f"task {task + 1} {stem}.safetensors"

    expected = {}
    for name, layer in module.adapted.items() if branches else ():
        expected[f"{name}.A"] = (layer.rank, layer.in_features)
        expected[f"{name}.B"] = (layer.out_features, layer.rank)
    branch = files.get("branch", {})
    if set(branch) != set(expected):
        missing, extra = sorted(set(expected) - set(branch))[:3], sorted(set(branch) - set(expected))[:3]
        raise ArtifactError(f"{where('branch')} does not match the model's adapted layers "
                            f"({f'missing e.g. {missing}' if missing else f'unexpected {extra}'}); was the run made "
                            "with another backbone?")
    for key, shape in expected.items():
        if tuple(branch[key].shape) != shape:
            raise ArtifactError(f"{where('branch')}: {key} has shape {tuple(branch[key].shape)}, "
                                f"the model expects {shape} (lora.rank or backbone changed?)")
    if module.gates is None and files.get("gate"):
        raise ArtifactError(f"{where('gate')}: a gate, but this config's method has none "
                            "(a run of another method?)")
    if module.gates is not None:
        gate = files.get("gate", {})
        want = module.gates.entry_shapes()
        for key, shape in want.items():
            if key not in gate or tuple(gate[key].shape) != shape:
                raise ArtifactError(f"{where('gate')}: {key} missing or not of shape {shape}")
        if set(gate) != set(want):
            raise ArtifactError(f"{where('gate')} holds {sorted(gate)}, the model's gates "
                                f"{sorted(want)} (a run of another method?)")
    for stem in ("branch", "gate"):  # what training writes: finite floating-point weights
        bad = next((k for k, v in files.get(stem, {}).items()
                    if not v.is_floating_point() or not torch.isfinite(v).all()), None)
        if bad is not None:
            raise ArtifactError(f"{where(stem)}: {bad} is not finite floating-point weights "
                                f"({files[stem][bad].dtype}); the file was altered")


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
    observers: list[TaskObserver] = field(default_factory=list)  # after the ResultsWriter the loop adds
    checkpoint: dict | None = None  # in-task checkpoints: every_n_epochs / every_n_train_steps
    single_task: list[float] | None = None  # S[j] from a single-task reference run: FWT

    def __post_init__(self) -> None:
        self.kind = run_kind(self.method.run_kind)
        self.forgetting = ForgettingMetrics(len(self.task_names), self.kind, self.single_task)
        self.observers = [ResultsWriter(self.run_dir, is_main=self.is_main, module=self.module), *self.observers]
        # True once every task finished earlier is verified and restored: only then may results.json
        # be written (a resume that fails before never replaces a finished run's results).
        self.consistent = False
        self.earlier_time = 0.0  # wall time of tasks finished in earlier attempts
        self.started = time.time()
        self.task_started = self.started
        self.task_times: list[float] = []  # wall time of each task trained in this process: the ETA
        self.steps_done = 0  # optimizer steps of the finished tasks: metrics.csv's global_step
        self.end_steps: dict[int, int] = {}  # task -> steps_done at its end

    def say(self, message: str) -> None:
        if self.is_main:  # one line per event, not one per rank
            print(f"[gainlora] {message}", flush=True)

    def label(self, t: int, name: str) -> str:
        n = len(self.task_names)
        return f"joint fit on all {n} tasks" if self.method.joint_training else f"task {t + 1}/{n} {name}"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.datamodule.tasks]

    def fits_after(self, t: int) -> int:
        return sum(1 for u, _ in fits(self.method, self.task_names) if u > t)

    def fit_name(self, t: int) -> str:
        return JOINT if self.method.joint_training else self.task_names[t]

    # -- the sequence ------------------------------------------------------------------------------
    def run(self) -> dict:
        self.started = time.time()
        self.method.setup(self.module, len(self.task_names))
        plan = fits(self.method, self.task_names)
        if self.is_main:
            self.run_dir.clean_leftovers()
        restored = self.restore(plan)
        self.consistent = True
        for t, name in restored:  # fill in what a kill right after a DONE marker left missing
            self.notify(TaskEnd(t, self.run_dir.task_dir(t, name), self.results("running"), restored=True,
                                global_step=self.end_steps[t]))
        for t, name in plan[len(restored):]:
            if self.stop.requested:  # a stop signal between tasks: stop at this boundary
                raise TaskInterrupted(f"stopped before task {t + 1} ({name}); finished tasks are saved")
            self.run_task(t, name)
        if self.is_main and self.checkpoint:  # every task's checkpoints went when it was done
            with contextlib.suppress(OSError):
                (self.run_dir.root / "checkpoints").rmdir()
        return self.finish("finished")

    def restore(self, plan: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Verify and restore the tasks finished in an earlier attempt (a prefix of the plan)."""
        restored = []
        for i, (t, name) in enumerate(plan):
            if not self.run_dir.is_done(t, name):
                later = [self.run_dir.task_dir(u, n) for u, n in plan[i + 1:] if self.run_dir.is_done(u, n)]
                if later:
                    raise ArtifactError(f"{self.run_dir.task_dir(t, name) / 'DONE'}: missing, but the later task "
                                        f"{later[0].name} is finished; restore the folder or delete the later ones")
                break
            files, meta = self.run_dir.load_task(t, name)
            restore_task(self.module, self.method, t, files, self.run_dir.task_dir(t, name))
            self.forgetting.record(t, meta["row"])
            self.earlier_time += meta.get("wall_time_s", 0.0)
            self.steps_done += meta.get("steps", 0)
            self.end_steps[t] = self.steps_done
            if self.is_main:  # a kill between DONE and this removal left it
                shutil.rmtree(self.run_dir.checkpoint_dir(t, name), ignore_errors=True)
            self.say(f"{self.label(t, name)}: finished earlier, restored")
            restored.append((t, name))
        return restored

    def run_task(self, t: int, name: str) -> None:
        label = self.label(t, name)
        if not self.progress_bar:  # else the task's bar names it
            self.say(f"{label}: start")
        self.begin_task(t)
        for observer in self.observers:
            observer.on_task_start(t, self.steps_done)
        callbacks = [TaskProgressBar(label, self.fits_after(t), self.task_times)] if self.progress_bar else []
        callbacks += [*self.method.callbacks(), self.forgetting, StopOnSignal(self.stop)]
        saver, last = self.in_task_checkpoint(t, name)  # last: it saves the batch's projected gate update
        trainer = self.make_trainer(t, callbacks + saver, len(self.datamodule.fit_tasks))
        if last is not None:
            self.say(f"{label}: continuing from its checkpoint {last.relative_to(self.run_dir.root)}")
        if not self.stop.requested:
            # weights_only: a checkpoint is tensors, numbers and strings; nothing in it runs code.
            trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=last, weights_only=True)
        if self.stop.requested or trainer.received_sigterm or trainer.interrupted:
            raise TaskInterrupted(f"task {t + 1} ({name}) was interrupted before it finished; finished tasks are saved")
        self.end_task(t, trainer)

    # -- one task: tests drive these two as well ---------------------------------------------------
    def begin_task(self, t: int) -> None:
        """Seed (a resumed task starts exactly as before), select task t's data, tell the module its
        task and regularizer, and let the method open its branch (and gate)."""
        self.task_started = time.time()
        L.seed_everything(self.seed + t, workers=True, verbose=False)
        self.datamodule.set_task(t, joint=self.method.joint_training)
        self.module.start_task(t, lambda: self.method.regularizer(self.module))
        self.method.on_task_start(self.module, t, self.datamodule.feature_batches)

    def end_task(self, t: int, trainer: L.Trainer | None = None) -> dict:
        """The method's task end (memories), the test on every seen task (``trainer``: the task's
        Trainer, else a fresh one), the task folder (DONE last), then the observers."""
        name = self.fit_name(t)
        self.method.on_task_end(self.module, t, self.datamodule.feature_batches)
        if trainer is None or self.forgetting not in trainer.callbacks:
            trainer = self.make_trainer(t, [self.forgetting], 1)
        trainer.test(self.module, datamodule=self.datamodule, verbose=False)  # records the matrix row
        row = [v for v in self.forgetting.matrix[-1] if v is not None]
        task_s, steps = time.time() - self.task_started, trainer.global_step  # 0 for a fresh Trainer
        self.task_times.append(task_s)
        self.steps_done += steps
        self.end_steps[t] = self.steps_done
        left = self.fits_after(t)
        eta = f"; sequence ETA {duration(sequence_eta(0, task_s, left, self.task_times))}" if left else ""
        self.say(f"{self.label(t, name)}: {steps} steps, {duration(task_s)}; scores on seen tasks {row}{eta}")
        if self.is_main:
            meta = {"task": t, "name": name, "row": row, "wall_time_s": task_s, "steps": steps}
            self.run_dir.save_task(t, name, task_tensors(self.module, self.method, t), meta,
                                   extra_json={PREDICTIONS: self.module.predictions})
            shutil.rmtree(self.run_dir.checkpoint_dir(t, name), ignore_errors=True)  # done: not needed
        results = self.results("running")
        self.notify(TaskEnd(t, self.run_dir.task_dir(t, name), results, global_step=self.steps_done))
        return results

    def notify(self, end: TaskEnd) -> None:
        for observer in self.observers:
            observer.on_task_end(end)

    def in_task_checkpoint(self, t: int, name: str) -> tuple[list[L.Callback], Path | None]:
        """The callback writing <run_dir>/checkpoints/<task>/last.ckpt, and that file if an interrupted
        attempt at this task left one (the task is re-opened exactly as before by the seeded
        ``begin_task``, then the checkpoint restores what trained, the optimizer and loop state)."""
        if not self.checkpoint:
            return [], None
        last = self.run_dir.checkpoint_dir(t, name) / "last.ckpt"
        steps = self.checkpoint.get("every_n_train_steps") or None
        saver = InTaskCheckpoint(last, every_n_train_steps=steps,
                                 every_n_epochs=None if steps else self.checkpoint.get("every_n_epochs"))
        return [saver], check_checkpoint(last, t, self.module)

    # -- results -----------------------------------------------------------------------------------
    def results(self, status: str) -> dict:
        rows = [[None if v is None else float(v) for v in r] for r in self.forgetting.matrix]
        truncation = self.datamodule.collator.truncation
        results = {**self.info, "tasks": self.task_names, "run_kind": self.kind.name, "matrix": rows,
                   **self.forgetting.metrics(),
                   "wall_time_s": round(self.earlier_time + time.time() - self.started, 2), "steps": self.steps_done,
                   "status": status,
                   "truncated": {"sources": truncation.sources, "targets": truncation.targets}}
        if self.kind.note:
            results["note"] = self.kind.note
        return results

    def finish(self, status: str) -> dict:
        """The results with ``status`` (finished, interrupted, failed: ...), given to the observers
        unless the run stopped before its finished tasks were all verified and restored."""
        results = self.results(status)
        if self.consistent:
            for observer in self.observers:
                observer.on_run_end(results)
        return results
