"""TaskStreamDataModule: streams tasks in order, one task at a time."""
from __future__ import annotations

from collections.abc import Iterator

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from gainlora.data.collate import Collator, EvalItem
from gainlora.data.token_sampler import GlobalTokenSampler, Tagged, TaggedCollate
from gainlora.data.types import PAD_TASK, Example, TaskData


class ResumableLoader(DataLoader):
    """A training loader that can continue an epoch where a checkpoint left it. Lightning saves and
    restores loaders that have ``state_dict``/``load_state_dict``; the sampler gives the epoch's
    permutation again and the batches already trained on are skipped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = {"epoch": -1, "batches": 0}  # batches handed out in the current epoch
        self._resume_at: dict | None = None

    def __iter__(self):
        # A generator: the epoch is read at the first batch, after Lightning's set_epoch.
        epoch = getattr(self.sampler, "epoch", 0)
        at, self._resume_at = self._resume_at, None
        skip = at["batches"] if at and at["epoch"] == epoch else 0
        self.position = {"epoch": epoch, "batches": skip}
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        for batch in batches:
            self.position["batches"] += 1  # sized loaders are not prefetched: handed out = trained on
            yield batch

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = dict(state_dict)


class TaskStreamDataModule(L.LightningDataModule):
    """Holds every task's data; ``set_task(t)`` selects what the next fit/test sees.

    - train: task t's training split, plus the replay examples set by ``set_replay`` (none unless a
      method replays: ``methods.replay``);
    - val: task t's validation split (model selection, if enabled);
    - with ``set_task(t, joint=True)`` (the multi-task reference) train and val are the union of
      tasks 0..t's splits instead;
    - test: tasks 0..t through ONE loader with a task column (several eval loaders break
      DeepSpeed ZeRO-3, Lightning #18473).

    Evaluation is the bulk of a long run (after task t all t + 1 seen tasks are generated for, 120
    task evaluations in 15 tasks), so each split of each task is tokenized once per run, and its
    items are generated for in length-sorted batches (``eval_schedule``): a batch decodes until its
    longest answer ends and pads to its longest source. The module puts predictions back in dataset
    order.
    """

    def __init__(self, tasks: list[TaskData], collator: Collator, *, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("the task stream is empty")
        self.tasks = tasks
        self.collator = collator
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.task = 0
        self.joint = False
        self.replay: list[Example] = []  # earlier tasks' examples mixed into the next fit's training data
        self._encoded: dict[tuple[str, int], list[EvalItem]] = {}  # (split, task): tokenized once per run
        # (split, task): each item's expected answer length in tokens, the reference's until the item
        # is generated for, then the last generated one (old tasks' answers barely change).
        self.answer_hints: dict[tuple[str, int], list[int]] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def set_task(self, task: int, *, joint: bool = False) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} outside 0..{self.num_tasks - 1}")
        self.task = task
        self.joint = joint

    @property
    def fit_tasks(self) -> list[int]:
        """The tasks whose training and validation data the next fit sees."""
        return list(range(self.task + 1)) if self.joint else [self.task]

    def train_data(self) -> list[Example]:
        """The fit tasks' own training examples (what features and memories are collected on)."""
        return [e for j in self.fit_tasks for e in self.tasks[j].train]

    def set_replay(self, examples: list[Example]) -> None:
        """Examples appended to the training data of the fits until the next call."""
        self.replay = list(examples)

    def _loader(self, data, collate, *, batch_size: int, sampler=None, cls=DataLoader) -> DataLoader:
        return cls(data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=False)

    def eval_items(self, split: str, task: int) -> list[EvalItem]:
        """Task ``task``'s ``split`` ("val" or "test"), tokenized on first use; ``index`` is each item's
        position in the split."""
        key = (split, task)
        if key not in self._encoded:
            data = self.tasks[task].val if split == "val" else self.tasks[task].test
            self._encoded[key] = self.collator.eval_items([(task, e, self.tasks[task].metric) for e in data])
            self.answer_hints[key] = self.collator.answer_tokens(data)
        return self._encoded[key]

    def eval_schedule(self, split: str, tasks: list[int]) -> list[EvalItem]:
        """The tasks' items, longest expected answer first, then longest source (stable: ties keep
        dataset order). Longest first: a batch that does not fit in memory fails at once."""
        items = [item for j in tasks for item in self.eval_items(split, j)]
        return sorted(items, key=lambda it: (self.answer_hints[(split, it.task)][it.index], len(it.ids)),
                      reverse=True)

    def remember_answer_lengths(self, split: str, rows: list[tuple[int, int, int]]) -> None:
        """(task, index, generated tokens) of an evaluation: the expected lengths of the next one."""
        for task, index, tokens in rows:
            self.answer_hints[(split, task)][index] = tokens

    def _eval_loader(self, items: list[EvalItem]) -> DataLoader:
        """Evaluation items, each scored exactly once however many ranks share them.

        Lightning's DistributedSampler would repeat items to even out the ranks, counting them twice.
        Instead the list is padded to a multiple of the world size with ``PAD_TASK`` rows, which are
        generated but never scored, and sharded here, so Lightning keeps this sampler. Rank r takes
        items r, r + W, ... of the sorted list: every rank's batch i has similar lengths.
        """
        world, rank = self._world()
        sampler = None
        if world > 1 and items:
            items = items + [items[0]._replace(task=PAD_TASK, index=-1)] * (-len(items) % world)
            sampler = DistributedSampler(items, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(items, self.collator.encoded_eval_batch, batch_size=self.eval_batch_size,
                            sampler=sampler)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by one seeded permutation per epoch that every rank shares, rank r taking items
        r, r + W, ...: with the per-device batch scaled down, N devices see the same global batches
        as one device does."""
        data = self.train_data() + self.replay
        world, rank = self._world()
        seed = self.seed * 1009 + self.task
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if world * accumulate > 1:  # one token mean over the global batch (gainlora.model.loss)
            sampler = GlobalTokenSampler(data, self.collator.answer_tokens(data), batch_size=self.batch_size,
                                         accumulate=accumulate, num_replicas=world, rank=rank, seed=seed)
            return self._loader(Tagged(data), TaggedCollate(self.collator.train_batch, world * accumulate),
                                batch_size=self.batch_size, sampler=sampler)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return self._loader(data, self.collator.train_batch, batch_size=self.batch_size,
                            sampler=sampler, cls=ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_schedule("val", self.fit_tasks))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_schedule("test", list(range(self.task + 1))))

    def feature_batches(self) -> Iterator[dict]:
        """The fit's training batches in a fixed order (covariance collection)."""
        return iter(self._loader(self.train_data(), self.collator.train_batch,
                                 batch_size=self.batch_size))
