"""Where this process stands among the ranks of a run, and what a continual run adds to DeepSpeed.

Two questions with different answers before training starts:
- ``is_main()``: should this process write the run directory? Lightning launches every rank with
  its rank in the environment and records it in ``rank_zero_only.rank`` before any process group
  exists, so this is right from the entry point on.
- ``shard()``: (rank, world size) of the initialised process group, for collective work (feature
  collection, prediction gathering); (0, 1) when there is none, so one process takes everything.

``continual_strategy`` adapts Lightning's DeepSpeedStrategy (or a subclass) to a run that hands one
module from Trainer to Trainer (docs/architecture.md, "Several processes").
"""
from __future__ import annotations

import functools

import torch
from lightning.pytorch.utilities import rank_zero_only


def is_main() -> bool:
    """Global rank 0 (also true in a single-process run)."""
    return rank_zero_only.rank == 0


def distributed() -> bool:
    """Is an initialised process group of more than one rank present?"""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def shard() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    if not distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_reduce_flat(tensors: list[torch.Tensor], mean: bool = False) -> list[torch.Tensor]:
    """The tensors summed (or averaged) over the ranks in one collective: flattened into one buffer,
    reduced, and split back into views of their shapes. Every rank must pass the same layout."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    if mean:
        flat /= torch.distributed.get_world_size()
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def rank_share(batches, max_batches: int | None, pad=None):
    """This rank's batches among the first ``max_batches`` (every world-th, by position).

    ``pad(batch)``, if given, is called with the first batch by a rank that drew one batch fewer
    than the first ranks: under FSDP every forward (and backward) through the sharded blocks is a
    collective, so every rank must run as many (without it the longer ranks hang). It must record
    nothing; elsewhere it costs one wasted batch on those ranks."""
    rank, world = shard()
    seen, first = 0, None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        seen, first = i + 1, batch if first is None else first
        if i % world == rank:
            yield batch
    if pad is not None and world > 1 and seen % world and rank >= seen % world:
        pad(first)


def last_micro_batch(trainer) -> bool:
    """Does the current micro-batch's backward end an optimizer step? Lightning's own rule, which
    under DeepSpeed is also the engine's boundary (both count micro-batches over the whole fit).
    True when a callback is driven without a Trainer (unit tests)."""
    return trainer is None or not trainer.fit_loop.epoch_loop._should_accumulate()


def zero3_partitioned(module: torch.nn.Module) -> bool:
    """Are ``module``'s parameters partitioned by a live ZeRO-3 engine? Its every forward is then
    a collective (each rank gathers the others' shards), so ranks must run as many forwards."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@functools.cache
def continual_strategy(cls: type) -> type:
    """``cls`` itself, or for a DeepSpeedStrategy class the same class with the two changes a
    continual run needs (``ContinualDeepSpeed``)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not issubclass(cls, DeepSpeedStrategy):
        return cls
    return type(cls.__name__, (ContinualDeepSpeed, cls), {"__module__": cls.__module__})


class ContinualDeepSpeed:
    """Mixed in before a DeepSpeedStrategy class by ``continual_strategy``.

    - Accumulation: Lightning divides the loss by ``accumulate_grad_batches`` before backward, and
      DeepSpeed's ``engine.backward`` divides it again (Lightning #6170); only Lightning's stays.
    - ZeRO-3 handover: an engine partitions the module's parameters in place (empty ``.data``,
      ``ds_*`` attributes, module hooks, a parameter dict that gathers on access). The next
      Trainer's engine, the method's task-boundary work (feature collection, new branches) and
      the saved tensors all need the whole module, so when a fit or test ends each parameter is
      gathered whole (one at a time, beside the shards until the engine goes), the engine is
      destroyed (its hooks removed) and what DeepSpeed added to the module and its parameters is
      removed, leaving the plain module the engine was given.
    """

    _plain: tuple[list, dict] | None = None  # (modules and their attribute names, parameter attribute names)

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def init_deepspeed(self) -> None:
        module = self.lightning_module
        if self.zero_stage_3:  # what the module is before the engine: what teardown restores
            self._plain = ([(m, set(vars(m))) for m in module.modules()],
                           {id(p): set(vars(p)) for p in module.parameters()})
        super().init_deepspeed()

    def teardown(self) -> None:
        if self.zero_stage_3 and self._plain is not None and self.lightning_module is not None:
            self._release_partitioned()
        super().teardown()

    def _release_partitioned(self) -> None:
        import deepspeed

        if isinstance(self.model, deepspeed.DeepSpeedEngine):
            self.model.empty_partition_cache()  # every parameter released by every submodule
        whole = {}
        for p in self.lightning_module.parameters():
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    whole[id(p)] = (p, p.data.clone())
        if isinstance(self.model, deepspeed.DeepSpeedEngine):
            self.model.destroy()
        modules, params = self._plain
        for m, names in modules:
            m._parameters = dict(dict.items(m._parameters))  # not ZeRO's dict that gathers on access
            for name in set(vars(m)) - names:
                delattr(m, name)
        for p, data in whole.values():
            for name in set(vars(p)) - params.get(id(p), set()):
                delattr(p, name)
            p.data = data
        self._plain = None
