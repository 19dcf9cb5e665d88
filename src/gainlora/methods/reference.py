"""The two reference runs of docs/method.md ("Baselines"): single-task and multi-task.

Neither is a continual method; they give the numbers continual runs are measured against.

- ``SingleTask``: every task is learned by a fresh LoRA branch from the plain backbone, with no
  earlier branch active: one branch, re-initialised (A kaiming, B zero, exactly as a new branch) at
  every task start. The diagonal R[j][j] of its matrix is S[j], the single-task score that FWT of
  other runs subtracts (``metrics.single_task_run``).
- ``MultiTask``: one branch trained jointly on the union of every task's training data in one fit
  (the loop reads ``joint_training``), then tested on every task: the upper bound.
"""
from __future__ import annotations

from gainlora.methods.base import Method
from gainlora.model.module import ContinualLM


class SingleTask(Method):
    """One branch, restarted from scratch at every task; gate-free."""

    name = "single_task"
    new_branch_per_task = False  # branch 0 always holds the task being (or last) learned
    run_kind = "single_task"

    def open_branch(self, model: ContinualLM, task: int) -> None:
        if model.num_branches == 0:
            model.add_branch()
        else:  # drop the previous task's branch: the model is the plain backbone again
            model.reset_branch()


class MultiTask(Method):
    """One branch, one fit on every task's training data at once; gate-free."""

    name = "multi_task"
    new_branch_per_task = False
    joint_training = True
    run_kind = "multi_task"
