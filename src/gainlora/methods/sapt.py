"""SAPT-LoRA (Zhao et al., ACL 2024, "SAPT: A Shared Attentive Framework for Parameter-Efficient
Continual Tuning of Large Language Models"; official code circle-hit/SAPT) on the framework's branches.

- Blocks: a new LoRA branch per task, old ones frozen (IncLoRA's machinery).
- Shared Attentive Learning & Selection: the branches are weighed per example by
  a = softmax_i(k_i . q(p0) / tau) (``model.task_attention.TaskAttention``), p0 the max-pooled input
  token embeddings of the source; the current key, the shared query network and the branch train.
- Attentive Reflection: after task j the mean attention of task j's training inputs is stored
  (a_bar_j over tasks 0..j). While task t trains, every ``frequency`` steps one batch of each old
  task j's replay samples adds ``kl_ratio * KL(target_j || softmax(s(x)))`` (batch mean), target_j
  being a_bar_j padded with zeros for tasks j+1..t: old inputs keep selecting old blocks.
  The replay samples are the shared ``ReplayBuffer``'s real examples (SAPT generates
  pseudo-samples); as in SAPT they enter only this KL, never the language-model loss.
- Memories (``memory.safetensors``): the buffer's indices, every target a_bar_j and the query
  network's latest weights, so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.callbacks.replay_mixer import ReplayMixer
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.types import Example
from gainlora.methods.base import Batches, IncLoRA, MaxBatches, Seed
from gainlora.methods.replay import ReplayBuffer, Size
from gainlora.model.module import ContinualLM
from gainlora.model.task_attention import TaskAttention

TARGET, QUERY = "sapt.target.", "sapt.query."


def reflection_loss(scores: Tensor, target: Tensor) -> Tensor:
    """KL(target || softmax(scores)) averaged over the batch (``nn.KLDivLoss(reduction="batchmean")``
    as SAPT computes it; zero-probability target entries contribute nothing). ``scores`` (B, n),
    ``target`` (n,), a distribution over the n tasks learned so far."""
    log_p = torch.log_softmax(scores.float(), dim=-1)
    return F.kl_div(log_p, target.to(log_p).expand_as(log_p), reduction="batchmean")


class SAPTLoRA(IncLoRA):
    """``hidden``: width of the shared query network; ``temperature``: tau / sqrt(d) (SAPT's
    ``attn_temperature 1`` is 1.0); ``kl_ratio``: weight of the reflection KL; ``per_task``,
    ``max_size``: the replay buffer; ``frequency``: one reflection batch per old task every
    ``frequency`` optimizer steps (SAPT's ``data_replay_freq``); ``seed``: keys, query network,
    buffer and replay-batch draws."""

    name = "sapt_lora"

    def __init__(self, *, hidden: Size = 100, temperature: Annotated[float, Field(gt=0)] = 1.0,
                 kl_ratio: Annotated[float, Field(ge=0)] = 0.5, per_task: Size = 50, max_size: Size = 200,
                 frequency: Size = 1, max_batches: MaxBatches = 100, seed: Seed = 0) -> None:
        super().__init__(max_batches=max_batches)
        self.gate_spec = {"kind": "attention", "pool": "max", "hidden": hidden, "temperature": temperature,
                          "seed": seed}
        self.kl_ratio, self.frequency, self.seed = kl_ratio, frequency, seed
        self.buffer = ReplayBuffer(per_task, max_size, seed)
        self.targets: dict[int, Tensor] = {}  # task j -> mean attention of its inputs after it, (j + 1,)
        self.model: ContinualLM | None = None
        self.datamodule: TaskStreamDataModule | None = None  # attached by ReplayMixer at each fit

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        if not isinstance(model.gates, TaskAttention):
            raise ValueError("SAPT-LoRA needs a model built with its gate_spec (task attention)")
        self.model = model

    # -- task boundaries ----------------------------------------------------------------------
    def open_branch(self, model: ContinualLM, task: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)
        model.gates.add_gate(generator=generator)
        model.add_branch()

    def on_task_end(self, model: ContinualLM, task: int, batches: Batches) -> None:
        super().on_task_end(model, task, batches)
        if self.datamodule is None:
            raise RuntimeError("sapt_lora: no datamodule attached (the ReplayMixer callback attaches it at fit)")
        self.targets[task] = self.mean_attention(model, batches)
        self.buffer.select(task, len(self.datamodule.tasks[task].train))

    @torch.no_grad()
    def mean_attention(self, model: ContinualLM, batches: Batches) -> Tensor:
        """Mean attention weights over the task's training inputs (at most ``max_batches`` batches)."""
        total, count = None, 0
        for i, batch in enumerate(batches()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            weights = self.attention(model, batch).double().sum(0)
            total, count = (weights if total is None else total + weights), count + len(batch["input_ids"])
        return (total / count).float()

    def attention(self, model: ContinualLM, batch: dict, logits: bool = False) -> Tensor:
        p0 = model.pooled_embeddings(batch["input_ids"].to(model.device), batch["gate_mask"].to(model.device))
        return model.gates.scores(p0) if logits else model.gates(p0)

    # -- training: the reflection loss on replayed samples ------------------------------------
    def replay_examples(self, datamodule: TaskStreamDataModule) -> list[Example]:
        """Nothing joins the language-model loss (ReplayMixer's source interface): SAPT's replayed
        samples drive only the attention KL."""
        return []

    def replay_batch(self, task: int, step: int) -> list[Example]:
        """Old task ``task``'s batch for replay step ``step``: consecutive slices of a seeded
        permutation of its kept examples, cycled; a function of the step alone, so a task resumed
        from an in-task checkpoint draws the same batches."""
        kept = self.buffer.task_examples(self.datamodule, task)
        current = self.datamodule.task
        generator = torch.Generator().manual_seed((self.seed * 1000 + current) * 1000 + task)
        order = torch.randperm(len(kept), generator=generator).tolist()
        size = min(self.datamodule.batch_size, len(kept))
        return [kept[order[(step * size + k) % len(kept)]] for k in range(size)]

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        old = [j for j in sorted(self.buffer.indices) if j < model.current_task and len(self.buffer.indices[j])]
        step = model.global_step
        if self.kl_ratio == 0 or not old or step % self.frequency:
            return None
        n = model.gates.num_gates
        total = torch.zeros((), device=model.device)
        for j in old:
            batch = self.datamodule.collator.train_batch(self.replay_batch(j, step // self.frequency))
            target = F.pad(self.targets[j], (0, n - len(self.targets[j])))
            total = total + reflection_loss(self.attention(model, batch, logits=True), target.to(model.device))
        return self.kl_ratio * total

    def callbacks(self) -> list[Callback]:
        return [ReplayMixer(self)]

    # -- persistence --------------------------------------------------------------------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        targets = {f"{TARGET}{j}": t.contiguous() for j, t in self.targets.items()}
        query = {f"{QUERY}{k}": v.detach().float().contiguous() for k, v in self.model.gates.query.state_dict().items()}
        return {**self.buffer.tensors(), **targets, **query}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        rest = self.buffer.load(tensors)
        self.targets.update({int(k[len(TARGET):]): v.float() for k, v in rest.items() if k.startswith(TARGET)})
        query = {k[len(QUERY):]: v for k, v in rest.items() if k.startswith(QUERY)}
        if query:
            self.model.gates.query.load_state_dict(query)
