"""The method interface, and the two plainest baselines (docs/method.md, "Baselines").

A method decides, at each task boundary, which branches and gates exist, how they start and what
is remembered. The continual loop calls ``on_task_start`` before a task's Trainer is built and
``on_task_end`` after it finished; everything in between is plain Lightning training.

Both boundaries follow one template, and a method changes behaviour by implementing its parts:
task start = ``open_branch`` -> collect what ``needs("start")`` asks for -> ``init_branch``;
task end = collect what ``needs("end")`` asks for -> ``update_memories``.

Constructor parameters carry their accepted ranges as annotations (``Annotated[..., Field(...)]``):
the config schema binds a ``method:`` section to the constructor's signature and checks them there.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.model.features import Features
from gainlora.model.module import ContinualLM

Batches = Callable[[], Iterable[dict]]  # a fresh pass over the current task's training batches
Stage = Literal["start", "end"]
Threshold = Annotated[float, Field(gt=0, le=1)]  # a GPM energy threshold eps
MaxBatches = Annotated[int, Field(ge=1)] | None  # cap on batches per feature collection; None: all
Seed = Annotated[int, Field(ge=0, lt=2**31)]  # a method's own draws: the range of the run's seed


@dataclass(frozen=True)
class Needs:
    """What a task boundary reads: adapted-layer input covariances and/or the current gate's."""

    layers: bool = False
    gate: bool = False


class Method:
    """IncLoRA behaviour by default: a new branch per task (A kaiming, B zero), old ones frozen."""

    name = "inclora"
    new_branch_per_task = True
    gate_spec: dict | None = None  # gate architecture for the model; None means gate-free
    # The loop reads these two. joint_training: one fit on the union of every task's training data
    # instead of one fit per task (the multi-task reference). run_kind: what results.json's matrix
    # means and which metrics apply (gainlora.run_kinds).
    joint_training = False
    run_kind = "continual"
    # False for prompt methods (L2P, LFPT5): no LoRA branch is opened; what they learn is in their
    # memory tensors, and the task folders hold no branch.safetensors.
    has_branches = True

    def __init__(self, max_batches: MaxBatches = 100) -> None:
        self.max_batches = max_batches
        self.num_tasks = 0

    @classmethod
    def argument_problem(cls, arguments: dict) -> tuple[str, str] | None:
        """A constraint between constructor arguments that one annotation cannot state, checked with
        the config: (argument, what is accepted) when violated, else None."""
        return None

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        self.num_tasks = num_tasks

    # -- task boundaries: the template ------------------------------------------------------------
    def on_task_start(self, model: ContinualLM, task: int, batches: Batches) -> None:
        self.open_branch(model, task)
        self.init_branch(model, task, self.collect(model, batches, self.needs("start")))

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        self.update_memories(model, task, self.collect(model, batches, self.needs("end")))

    # -- task boundaries: the parts -----------------------------------------------------------------
    def needs(self, stage: Stage) -> Needs:
        """The features ``init_branch`` (stage "start") or ``update_memories`` ("end") read; nothing
        is collected unless asked for."""
        return Needs()

    def open_branch(self, model: ContinualLM, task: int) -> None:
        """Open what the task trains (before any feature collection)."""
        if self.new_branch_per_task or model.num_branches == 0:
            model.add_branch()

    def init_branch(self, model: ContinualLM, task: int, feats: Features) -> None:
        """Set the new branch's starting values from the task's features (InfLoRA); default: keep."""

    def update_memories(self, model: ContinualLM, task: int, feats: Features) -> None:
        """Grow memories with the finished task's features; default: none."""

    def collect(self, model: ContinualLM, batches: Batches, needs: Needs) -> Features:
        if not (needs.layers or needs.gate):
            return Features()
        return model.collect_features(batches(), max_batches=self.max_batches, layers=needs.layers, gate=needs.gate)

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
