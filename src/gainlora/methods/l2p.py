"""L2P (Wang et al., CVPR 2022, "Learning to Prompt for Continual Learning") on a frozen language model.

A pool of M prompts P_i (L vectors each) with keys k_i is shared by every task. For an input x the
query q(x) is the mean of the frozen model's final hidden states over x's tokens, computed without
prompts (T5: the encoder's output; decoder-only: the last hidden states); the N keys most
cosine-similar to q(x) select their prompts, which are concatenated (most similar first) and put
in front of x's embeddings (``gainlora.model.prompts``). The training loss is

    loss = CE(prompted model) + lambda * mean_batch sum_{i in top-N(x)} (1 - cos(q(x), k_i))

(eq. 5, the surrogate term that pulls the selected keys toward the queries). The whole pool and all
keys train on every task; the backbone stays frozen and no LoRA branch is opened. The pool after
each task is the method's memory (``l2p.prompts``, ``l2p.keys``), restored exactly on resume.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from gainlora.methods.base import Method, Seed
from gainlora.model.module import ContinualLM
from gainlora.model.prompts import PromptPool, vocabulary_init

PREFIX = "l2p"


class L2P(Method):
    name = "l2p"
    new_branch_per_task = False
    has_branches = False

    # bounds: prompts are input positions and pool memory; past them a run dies allocating, not learning
    def __init__(self, pool_size: Annotated[int, Field(ge=1, le=1024)] = 10,
                 prompt_length: Annotated[int, Field(ge=1, le=512)] = 5, top_n: Annotated[int, Field(ge=1)] = 5, lam: Annotated[float, Field(ge=0)] = 0.1,
                 seed: Seed = 0) -> None:
        super().__init__(max_batches=None)
        self.pool_size, self.prompt_length, self.top_n, self.lam, self.seed = pool_size, prompt_length, top_n, lam, seed
        self.pool: PromptPool | None = None

    @classmethod
    def argument_problem(cls, arguments: dict) -> tuple[str, str] | None:
        if arguments["top_n"] > arguments["pool_size"]:
            return "top_n", f"at most pool_size ({arguments['pool_size']}): the prompts selected from the pool"
        if arguments["top_n"] * arguments["prompt_length"] > 512:
            return "top_n", (f"top_n x prompt_length at most 512 prompt positions in front of the input (here "
                             f"{arguments['top_n']} x {arguments['prompt_length']})")
        return None

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        generator = torch.Generator().manual_seed(self.seed)
        embeddings = model.backbone.get_input_embeddings().weight
        d = embeddings.shape[1]
        prompts = vocabulary_init(embeddings, (self.pool_size, self.prompt_length, d), generator)
        keys = torch.rand(self.pool_size, d, generator=generator) * 2 - 1  # uniform(-1, 1), as the official code
        self.pool = PromptPool(prompts.to(embeddings.device), keys.to(embeddings.device), self.top_n)
        model.prompter = self.pool

    def open_branch(self, model: ContinualLM, task: int) -> None:
        """Nothing to open: the pool trains on every task."""

    def regularizer(self, model: ContinualLM) -> Tensor | None:
        pull = self.pool.pull if self.pool is not None else None
        return None if pull is None or not self.lam else self.lam * pull

    # -- persistence: float32 as held ---------------------------------------------------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}.prompts": self.pool.prompts_.detach().cpu().contiguous(),
                f"{PREFIX}.keys": self.pool.keys.detach().cpu().contiguous()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, param in (("prompts", self.pool.prompts_), ("keys", self.pool.keys)):
                value = tensors[f"{PREFIX}.{name}"]
                if value.shape != param.shape:
                    raise ValueError(f"{PREFIX}.{name}: saved shape {tuple(value.shape)}, the pool has "
                                     f"{tuple(param.shape)} (pool_size, prompt_length or backbone changed?)")
                param.copy_(value)
