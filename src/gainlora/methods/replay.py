"""Experience replay: a bounded, seeded buffer of earlier tasks' training examples (``ReplayBuffer``,
usable by any method), and ``Replay``, which wraps any continual method and mixes the buffer into the
training data of every later task.

- Selection: after task t, a seeded permutation of task t's training examples (seed, t); the buffer
  keeps its first ``per_task`` entries.
- Bound: with k tasks learned each task keeps the first min(per_task, max_size // k) of its entries,
  so the buffer never holds more than ``max_size`` examples and every task keeps an equal share
  (prefixes of fixed permutations: the same buffer whatever the history of trims).
- Mixing (SAPT's ``data_replay_freq``: one replay batch per ``frequency`` batches of the task): the
  fit of task t trains on its own examples plus ceil(n_t / frequency) buffer examples, taken round
  robin over the old tasks and cycled, all shuffled together by the usual sampler.
- Persistence: the kept indices are int64 tensors in the run's memory files, so a resumed run mixes
  exactly the same examples (the data itself is deterministic given the config).
"""
from __future__ import annotations

import math
from itertools import cycle, islice
from typing import Annotated

import torch
from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.callbacks.replay_mixer import ReplayMixer
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.types import Example
from gainlora.methods.base import Batches, Method, Seed
from gainlora.model.module import ContinualLM

PREFIX = "replay.task."
Size = Annotated[int, Field(ge=1)]


class ReplayBuffer:
    """Which training examples of each finished task are kept: task -> indices into its training split."""

    def __init__(self, per_task: int, max_size: int, seed: int = 0) -> None:
        self.per_task, self.max_size, self.seed = per_task, max_size, seed
        self.indices: dict[int, Tensor] = {}

    def quota(self, tasks_learned: int) -> int:
        return min(self.per_task, self.max_size // max(tasks_learned, 1))

    def select(self, task: int, num_examples: int) -> None:
        """Keep task ``task``'s share of the buffer and trim every task to its quota."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)
        self.indices[task] = torch.randperm(num_examples, generator=generator)[: self.per_task]
        quota = self.quota(len(self.indices))
        self.indices = {j: idx[:quota].clone() for j, idx in self.indices.items()}

    def task_examples(self, datamodule: TaskStreamDataModule, task: int) -> list[Example]:
        return [datamodule.tasks[task].train[i] for i in self.indices[task].tolist()]

    def examples(self, datamodule: TaskStreamDataModule, before: int) -> list[Example]:
        """The kept examples of tasks < ``before``, round robin over tasks."""
        groups = [self.task_examples(datamodule, j) for j in sorted(self.indices) if j < before]
        return [g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)]

    # -- persistence: int64 indices in memory.safetensors ---------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{j}": idx.to(torch.int64).contiguous() for j, idx in self.indices.items()}

    def load(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Take the buffer's entries (if any); returns the other tensors."""
        kept = {int(k[len(PREFIX):]): v.to(torch.int64) for k, v in tensors.items() if k.startswith(PREFIX)}
        if kept:
            self.indices = kept
        return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


class Replay(Method):
    def __init__(self, method: Method, *, per_task: Size = 50, max_size: Size = 200, frequency: Size = 4,
                 seed: Seed = 0) -> None:
        super().__init__(max_batches=method.max_batches)
        if method.run_kind != "continual" or method.joint_training or hasattr(method, "buffer"):
            raise ValueError(f"its method: a continual method without a replay buffer of its own, not {method.name}")
        self.method = method
        self.name = f"{method.name}_replay"
        self.frequency = frequency
        self.buffer = ReplayBuffer(per_task, max_size, seed)
        # what the loop and the model read from a method (the task hooks are delegated below)
        self.new_branch_per_task, self.gate_spec = method.new_branch_per_task, method.gate_spec
        self.datamodule: TaskStreamDataModule | None = None  # attached by ReplayMixer at each fit

    def replay_examples(self, datamodule: TaskStreamDataModule) -> list[Example]:
        """What the fit of the datamodule's current task mixes in (empty for the first task)."""
        buffer = self.buffer.examples(datamodule, datamodule.task)
        if not buffer:
            return []
        count = math.ceil(len(datamodule.train_data()) / self.frequency)
        return list(islice(cycle(buffer), count))

    # -- the wrapped method ---------------------------------------------------------------------
    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        self.method.setup(model, num_tasks)

    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        self.method.on_task_start(model, task, batches)

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        self.method.on_task_end(model, task, batches)
        if self.datamodule is None:
            raise RuntimeError("replay: no datamodule attached (the ReplayMixer callback attaches it at fit)")
        self.buffer.select(task, len(self.datamodule.tasks[task].train))

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        return self.method.regularizer(model)

    def callbacks(self) -> list[Callback]:
        return [*self.method.callbacks(), ReplayMixer(self)]

    def branch_for_task(self, task: int) -> int:
        return self.method.branch_for_task(task)

    def memory_tensors(self) -> dict[str, Tensor]:
        return {**self.method.memory_tensors(), **self.buffer.tensors()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.method.load_memory_tensors(self.buffer.load(tensors))
