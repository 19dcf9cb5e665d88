"""LFPT5 (Qin and Joty, ICLR 2022, "LFPT5: A Unified Framework for Lifelong Few-shot Language Learning
Based on Prompt Tuning of T5") on a frozen language model.

One soft prompt P (L vectors in front of every input) is the only trained tensor, continued through
the tasks. The prompted model is trained as a task solver and as a data generator of its tasks:

- LM examples: the task's prefix ``__<task>__`` as source, ``<source> __ans__ <target>`` as target;
- before task t > 0, the model (with the prompt as it was after task t-1, kept frozen as the
  teacher P') samples ``pseudo_per_task`` texts from each earlier task's prefix; a text containing
  ``__ans__`` becomes a pseudo-sample of that task (source before it, target after it, labelled with
  the task in its id) and also an LM example of that task;
- the pseudo-samples are mixed into task t's training data (as replay mixes stored examples);
- every training step adds a batch of LM examples and, from task 2 on, a batch of pseudo-samples
  distilled from the teacher:

    loss = CE(task batch) + lm_lambda * CE(LM batch) + kl_weight * KL(p_P'(y|x) || p_P(y|x))

  with the KL summed over the vocabulary and averaged over the pseudo-samples' answer tokens.

The prompt after each task is the method's memory (``lfpt5.prompt``); the teacher is that prompt at
the next task's start, and the pseudo-samples are sampled from it with a seed of their own, so a
resumed run (task boundary or in-task checkpoint) regenerates exactly the same ones.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

import lightning as L
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from gainlora.data.collate import TruncationCounter
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.types import Example
from gainlora.methods.base import Method, Seed
from gainlora.model.module import ContinualLM
from gainlora.model.prompts import TaskPrompt, vocabulary_init

log = logging.getLogger("gainlora")
PREFIX = "lfpt5"
ANSWER = "__ans__"


def gen_prefix(task: str) -> str:
    return f"__{task}__"


def lm_example(task: str, example: Example) -> Example:
    text = f"{example.source} {ANSWER} {example.target}"
    return Example(source=gen_prefix(task), target=text, references=(text,), id=f"lm:{task}")


def parse_pseudo(texts: list[str], task: int, name: str) -> list[Example]:
    """Generated texts -> pseudo-samples of task ``task`` (id ``pseudo:<task>:<k>``); texts without
    ``__ans__`` or with an empty side are dropped, as in the reference."""
    found = []
    for k, text in enumerate(texts):
        source, sep, target = text.replace(gen_prefix(name), "").partition(ANSWER)
        source, target = source.strip(), target.strip()
        if sep and source and target:
            found.append(Example(source=source, target=target, references=(target,), id=f"pseudo:{task}:{k}"))
    return found


def pseudo_task(example: Example) -> int:
    """The task a pseudo-sample was generated for."""
    return int(example.id.split(":")[1])


def distillation_kl(student: Tensor, teacher: Tensor, labels: Tensor, *, causal: bool) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) summed over the vocabulary, averaged over the answer
    tokens (labels != -100); causal logits at i predict token i + 1."""
    if causal:
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    keep = labels != -100
    s = F.log_softmax(student[keep].float(), dim=-1)
    t = F.log_softmax(teacher[keep].float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / keep.sum().clamp_min(1)


def cycled(examples: list[Example], step: int, size: int) -> list[Example]:
    """The ``step``-th batch of ``size`` taken round the list (the list cycles)."""
    start = step * size
    return [examples[(start + i) % len(examples)] for i in range(min(size, len(examples)))]


class LFPT5(Method):
    name = "lfpt5"
    new_branch_per_task = False
    has_branches = False

    def __init__(self, prompt_length: Annotated[int, Field(ge=1, le=512)] = 100,  # input positions
                 lm_lambda: Annotated[float, Field(ge=0)] = 0.25,
                 kl_weight: Annotated[float, Field(ge=0)] = 0.0526316,  # 0.05 / (1 - 0.05)
                 pseudo_per_task: Annotated[int, Field(ge=0, le=10**5)] = 50,  # each a generation, held in memory
                 generation_tokens: Annotated[int, Field(ge=1, le=1024)] = 64,
                 top_k: Annotated[int, Field(ge=1)] = 64, seed: Seed = 0) -> None:
        super().__init__(max_batches=None)
        self.prompt_length, self.lm_lambda, self.kl_weight = prompt_length, lm_lambda, kl_weight
        self.pseudo_per_task, self.generation_tokens, self.top_k, self.seed = (pseudo_per_task, generation_tokens,
                                                                              top_k, seed)
        self.prompt: TaskPrompt | None = None
        self.task = 0
        self.pseudo: list[Example] = []  # this task's pseudo-samples of earlier tasks
        self.lm: list[Example] = []  # this task's LM examples (its own and the pseudo-samples')
        self.datamodule: TaskStreamDataModule | None = None
        self.lm_collator = None  # the datamodule's collator with room for LM targets (set per fit)

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        embeddings = model.backbone.get_input_embeddings().weight
        init = vocabulary_init(embeddings, (self.prompt_length, embeddings.shape[1]),
                               torch.Generator().manual_seed(self.seed))
        self.prompt = TaskPrompt(init.to(embeddings.device))
        model.prompter = self.prompt

    def open_branch(self, model: ContinualLM, task: int) -> None:
        """No branch: the prompt is continued; its state now is the teacher for this task."""
        self.task = task
        with torch.no_grad():
            self.prompt.teacher.copy_(self.prompt.prompt)

    def callbacks(self) -> list[L.Callback]:
        return [PseudoSamples(self)]

    # -- pseudo-samples --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_texts(self, model: ContinualLM, datamodule: TaskStreamDataModule, task: int) -> list[str]:
        """``pseudo_per_task`` texts sampled (top-k) from task ``task``'s prefix by the teacher."""
        name = datamodule.tasks[task].name
        item = (task, Example(source=gen_prefix(name), target="", references=("",)), "exact_match")
        texts: list[str] = []
        devices = [model.device] if model.device.type == "cuda" else []
        was_training = model.training
        model.eval()
        self.prompt.use_teacher = True
        try:
            with torch.random.fork_rng(devices=devices):  # the run's RNG stream is left as it was
                torch.manual_seed(self.seed * 100_003 + self.task * 1_009 + task)
                while len(texts) < self.pseudo_per_task:
                    n = min(datamodule.eval_batch_size, self.pseudo_per_task - len(texts))
                    batch = model._to_device(datamodule.collator.eval_batch([item] * n))
                    texts += model.generate(batch, do_sample=True, top_k=self.top_k, num_beams=1,
                                            max_new_tokens=self.generation_tokens)
        finally:
            self.prompt.use_teacher = False
            model.train(was_training)
        return texts

    def prepare(self, model: ContinualLM, datamodule: TaskStreamDataModule) -> list[Example]:
        """This task's pseudo-samples (mixed into its training data) and LM examples."""
        self.datamodule = datamodule
        # LM targets hold a source and its answer: room for both, truncations counted apart
        base = datamodule.collator
        self.lm_collator = dataclasses.replace(base, truncation=TruncationCounter(),
                                               max_target_length=base.max_source_length + base.max_target_length)
        self.pseudo = []
        for j in range(self.task):
            found = parse_pseudo(self.generate_texts(model, datamodule, j), j, datamodule.tasks[j].name)
            log.info("lfpt5: %d of %d sampled texts of task %s are pseudo-samples (have %s)", len(found),
                     self.pseudo_per_task, datamodule.tasks[j].name, ANSWER)
            self.pseudo += found
        own = datamodule.tasks[self.task].train
        names = [t.name for t in datamodule.tasks]
        self.lm = [lm_example(names[self.task], e) for e in own]
        self.lm += [lm_example(names[pseudo_task(e)], e) for e in self.pseudo]
        order = torch.randperm(len(self.lm), generator=torch.Generator().manual_seed(self.seed + self.task))
        self.lm = [self.lm[i] for i in order.tolist()]
        return self.pseudo

    # -- the loss terms ----------------------------------------------------------------------------
    def regularizer(self, model: ContinualLM) -> Tensor | None:
        if self.datamodule is None or not self.lm:
            return None
        # the optimizer step picks the batches, so an in-task resume continues with the same ones
        step, size = model.global_step, self.datamodule.batch_size
        total = None
        if self.lm_lambda:
            batch = self.lm_collator.train_batch(cycled(self.lm, step, size))
            total = self.lm_lambda * model(model._to_device(batch))
        if self.pseudo and self.kl_weight:
            batch = self.datamodule.collator.train_batch(cycled(self.pseudo, step, size))
            kl = self.kl_weight * self.distill(model, model._to_device(batch))
            total = kl if total is None else total + kl
        return total

    def distill(self, model: ContinualLM, batch: dict) -> Tensor:
        inputs = model.prompted_inputs(batch)  # causal: labels extended with -100 at the prompt
        student = model.backbone(**inputs).logits
        self.prompt.use_teacher = True
        try:
            with torch.no_grad():
                teacher = model.backbone(**model.prompted_inputs(batch)).logits
        finally:
            self.prompt.use_teacher = False
        return distillation_kl(student, teacher, inputs["labels"], causal=model.kind == "causal")

    # -- persistence -------------------------------------------------------------------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}.prompt": self.prompt.prompt.detach().cpu().contiguous()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        value = tensors[f"{PREFIX}.prompt"]
        if value.shape != self.prompt.prompt.shape:
            raise ValueError(f"{PREFIX}.prompt: saved shape {tuple(value.shape)}, the model's prompt has "
                             f"{tuple(self.prompt.prompt.shape)} (prompt_length or backbone changed?)")
        with torch.no_grad():
            self.prompt.prompt.copy_(value)


class PseudoSamples(L.Callback):
    """At the fit's start (the model on its device, before the train loader is built) the method
    samples its pseudo-samples and the datamodule mixes them in; cleared when the fit ends."""

    def __init__(self, method: LFPT5) -> None:
        self.method = method

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.datamodule.set_replay(self.method.prepare(pl_module, trainer.datamodule))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            trainer.datamodule.set_replay([])
