"""The method interface, and the two plainest baselines (METHOD.md, Baselines).

A method decides, at each task boundary, which branches and gates exist, how they start and what
is remembered. The continual loop calls ``on_task_start`` before a task's Trainer is built and
``on_task_end`` after it finished; everything in between is plain Lightning training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from lightning import Callback
from torch import Tensor

from gainlora.model.module import ContinualLM, Features

Batches = Callable[[], Iterable[dict]]  # a fresh pass over the current task's training batches


class Method:
    """IncLoRA behaviour by default: a new branch per task (A kaiming, B zero), old ones frozen."""

    name = "inclora"
    new_branch_per_task = True
    wants_layer_features = False  # does init_branch / update_memories need layer covariances?
    gate_spec: dict | None = None  # gate architecture for the model; None means gate-free
    # The loop reads these two. joint_training: one fit on the union of every task's training data
    # instead of one fit per task (the multi-task reference). run_kind: what results.json's matrix
    # means and which metrics apply (gainlora.metrics.RUN_KINDS).
    joint_training = False
    run_kind = "continual"

    def __init__(self, max_batches: int | None = 100) -> None:
        self.max_batches = max_batches  # cap on batches for feature collection
        self.num_tasks = 0

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        self.num_tasks = num_tasks

    # -- task boundaries ----------------------------------------------------------------------
    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        self.open_branch(model, task)
        feats = self.collect(model, batches, layers=self.wants_layer_features)
        self.init_branch(model, task, feats)

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        if self.wants_layer_features:
            self.update_memories(model, task, self.collect(model, batches, layers=True))

    def open_branch(self, model: ContinualLM, task: int) -> None:
        if self.new_branch_per_task or model.num_branches == 0:
            model.add_branch()

    def init_branch(self, model: ContinualLM, task: int, feats: Features) -> None:
        """Set the new branch's starting values from the features (InfLoRA); default: keep."""

    def update_memories(self, model: ContinualLM, task: int, feats: Features) -> None:
        """Grow memories with the finished task's features."""

    def collect(self, model: ContinualLM, batches: Batches, *, layers: bool, gate: bool = False) -> Features:
        if not (layers or gate):
            return Features()
        return model.collect_features(batches(), max_batches=self.max_batches, layers=layers, gate=gate)

    # -- training-time hooks --------------------------------------------------------------------
    def regularizer(self, model: ContinualLM) -> Tensor | None:
        return None

    def callbacks(self) -> list[Callback]:
        return []

    def branch_for_task(self, task: int) -> int:
        """Index of the branch that holds what task ``task`` learned."""
        return task if self.new_branch_per_task else 0

    # -- persistence (safetensors: flat name -> tensor) ------------------------------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        pass


class IncLoRA(Method):
    """A new LoRA branch per task; old branches frozen; every branch summed with weight 1."""

    name = "inclora"


class SeqLoRA(Method):
    """One LoRA branch trained through every task in turn."""

    name = "seqlora"
    new_branch_per_task = False


def subspace_tensors(prefix: str, spaces: dict) -> dict[str, Tensor]:
    # float64 as held: a float32 round trip would make a resumed run drift from an uninterrupted one
    return {f"{prefix}.{name}": space.basis.contiguous() for name, space in spaces.items()}

