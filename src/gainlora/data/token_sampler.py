"""Training batches that carry the answer-token count of their whole global batch.

Every rank draws the same seeded permutation (``DistributedSampler``), so every rank can tell which
examples the other ranks hold in the current optimizer step, and sum their answer tokens without a
collective. ``gainlora.model.loss.global_token_loss`` divides by that count, which makes N devices
(and gradient accumulation) train exactly as one device on the whole global batch does.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import Dataset, DistributedSampler


class GlobalTokenSampler(DistributedSampler):
    """This rank's share of one shared permutation, as ``DistributedSampler`` (Lightning keeps it),
    each index paired with the answer-token count of its optimizer step's global batch.

    Rank r's optimizer step s covers its items [s*b*A, (s+1)*b*A) (b per-device batch, A
    accumulation steps; Lightning restarts accumulation each epoch and steps on a short last
    group); the global batch is that slice of every rank's shard, padding repeats included.
    """

    def __init__(self, data, answer_tokens: list[int], *, batch_size: int, accumulate: int,
                 num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(answer_tokens) != len(data):
            raise ValueError(f"{len(answer_tokens)} token counts for {len(data)} examples")
        self.answer_tokens = answer_tokens
        self.per_step = batch_size * accumulate

    def _shard(self, rank: int) -> list[int]:
        """Rank ``rank``'s indices this epoch, by torch's own sharding."""
        sampler = DistributedSampler(self.dataset, num_replicas=self.num_replicas, rank=rank, shuffle=True,
                                     seed=self.seed, drop_last=self.drop_last)
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shards = [self._shard(r) for r in range(self.num_replicas)]
        mine = shards[self.rank]
        for start in range(0, len(mine), self.per_step):
            tokens = sum(self.answer_tokens[i] for shard in shards for i in shard[start:start + self.per_step])
            for index in mine[start:start + self.per_step]:
                yield index, tokens


class Tagged(Dataset):
    """Looks items up by the sampler's (index, global tokens) pairs and keeps the count."""

    def __init__(self, data: list) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> tuple[object, int]:
        index, tokens = key
        return self.data[index], tokens


class TaggedCollate:
    """Wraps a training collate function: adds ``global_tokens`` and ``replicas`` to the batch.
    A class, not a closure, so that loader worker processes can pickle it."""

    def __init__(self, collate: Callable[[list], dict], replicas: int) -> None:
        self.collate, self.replicas = collate, replicas

    def __call__(self, items: list[tuple[object, int]]) -> dict:
        batch = self.collate([example for example, _ in items])
        batch["global_tokens"] = items[0][1]  # one optimizer step's items share one count
        batch["replicas"] = self.replicas
        return batch
