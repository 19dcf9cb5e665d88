"""FSDP (PyTorch's fully_shard, "FSDP2") through Lightning's ModelParallelStrategy: the frozen
backbone sharded, what trains replicated.

Lightning's ModelParallelStrategy hands the LightningModule a device mesh and calls its
``configure_model`` at every Trainer's setup; the module calls ``configure_model`` here, which
applies ``fully_shard`` once to every transformer block of the backbone (the classes Hugging Face
lists in ``_no_split_modules``). What the blocks shard is only the backbone's own frozen weights:

- LoRA branches and gates change every task (a new Parameter per task, frozen ones appended to
  buffers). FSDP would hold on to the first task's Parameters and write them back at every
  unshard, so they are ``ignored_params`` and stay whole, replicated tensors on every rank, as are
  the later tasks' Parameters, which no FSDP unit ever sees. Their gradients are averaged over the
  ranks by ``ReplicatedGradients`` before each optimizer step (DDP's mean: the loss is already
  scaled for it, ``gainlora.model.loss``), so every rank takes the same step and the gate
  projection reads and writes whole tensors: it stays exact, as in one process.
- The input embedding is read outside the backbone's forward (the gates' pooled p0) and the rest
  (final norms, the LM head) is small: replicated as well. The backbone is the FSDP root (holding
  none of them), so each block is gathered for its forward and resharded after it.

Between Trainers nothing is unwrapped: the blocks stay sharded and every boundary computation
(feature collection, generation) runs forward through them, which gathers each block's weights
collectively. So every rank must run as many forwards: ``collect_features`` pads with forwards
that record nothing, and generation runs with ``synced_gpus`` (transformers reads the
``_is_fsdp_managed_module`` flag set here); the evaluation loaders already give every rank as many
batches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import nn

from gainlora.dist import all_reduce_flat, distributed
from gainlora.model.stacks import FrozenStack

if TYPE_CHECKING:
    from gainlora.model.module import ContinualLM


def configured(strategy: dict) -> bool:
    """A strategy section naming ModelParallelStrategy (by name: nothing is imported)."""
    return str(strategy.get("_target_", "")).rpartition(".")[2] == "ModelParallelStrategy"


def check(strategy: dict, trainer: dict) -> None:
    """Config-time checks of a strategy section (raises ConfigError): FSDP here is data parallel over
    every device, through ModelParallelStrategy only."""
    from gainlora.targets import refuse

    target, name = str(strategy.get("_target_", "")), str(strategy.get("name", ""))
    if target.rpartition(".")[2] == "FSDPStrategy" or name.startswith("fsdp"):
        # Lightning 2.6 runs FSDPStrategy (FSDP1) on CUDA only, so it cannot be tested on CPU, and
        # FSDP1 flattens each unit's Parameters once while every task adds new branch and gate ones.
        raise refuse("strategy", target or name, "strategy=fsdp (conf/strategy/fsdp.yaml: ModelParallelStrategy "
                     "with fully_shard); Lightning's FSDPStrategy (FSDP1) is not supported: it flattens each "
                     "unit's parameters once, and every task adds new branch and gate parameters")
    if not configured(strategy):
        return
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or devices < 1:
        raise refuse("trainer.devices", devices, "a number of devices under strategy=fsdp (its data-parallel size)")
    if strategy.get("tensor_parallel_size") != 1:
        raise refuse("strategy.tensor_parallel_size", strategy.get("tensor_parallel_size"),
                     "1 (FSDP here is data parallel only)")
    if strategy.get("data_parallel_size") != devices * nodes:
        raise refuse("strategy.data_parallel_size", strategy.get("data_parallel_size"),
                     f"{devices * nodes}, every device (trainer.devices x trainer.num_nodes)")


def is_fsdp(strategy) -> bool:
    """A Trainer's strategy is Lightning's ModelParallelStrategy (or a subclass)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's repeated transformer blocks: the units Hugging Face never splits across devices."""
    names = set(getattr(backbone, "_no_split_modules", None) or ())
    found = [m for m in backbone.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # FSDP subclasses
    if not found:
        raise RuntimeError(f"{type(backbone).__name__} names no transformer block class (_no_split_modules); "
                           "FSDP needs one to shard by")
    return found


def replicated(module: ContinualLM) -> set[nn.Parameter]:
    """Parameters FSDP must leave whole: branch and gate slots (any task's) and the input embedding."""
    keep = set(module.backbone.get_input_embeddings().parameters())
    keep |= {p for p in module.parameters() if p.requires_grad}
    for stack in module.modules():
        if isinstance(stack, FrozenStack):
            keep |= {p for p in (getattr(stack, s.param) for s in stack.slots) if p is not None}
    return keep


def is_sharded(module: ContinualLM) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.backbone.modules())


def configure_model(module: ContinualLM) -> None:
    """Shard the frozen backbone over the strategy's data-parallel mesh, once per run (each Trainer
    calls this again; the module keeps its sharded blocks across Trainers)."""
    trainer = module._trainer
    if trainer is None or not is_fsdp(trainer.strategy) or is_sharded(module):
        return
    local, full, units = shard(module, trainer.strategy.device_mesh["data_parallel"])
    if trainer.is_global_zero:
        print(f"[gainlora] FSDP: {units} blocks sharded over {trainer.world_size} devices; rank 0 holds "
              f"{local} of their {full} frozen weights", flush=True)


def shard(module: ContinualLM, mesh) -> tuple[int, int, int]:
    """fully_shard every block of ``module``'s backbone over ``mesh``, then the backbone as the root.
    Returns (this rank's block weights, all block weights, blocks): element counts."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    keep = replicated(module)
    units = blocks(module.backbone)
    for block in units:
        fully_shard(block, mesh=mesh, ignored_params=keep)
    # The backbone is the FSDP root, holding nothing itself (the rest is replicated). A block that
    # is its own root keeps its weights whole after a forward (FSDP skips the root's reshard for
    # the backward), so all blocks would end up whole: memory as without sharding.
    outside = {p for p in module.backbone.parameters() if not isinstance(p, DTensor)}
    fully_shard(module.backbone, mesh=mesh, ignored_params=keep | outside)
    register_fsdp_forward_method(module.backbone, "generate")  # generate() enters through the root too
    # Some forwards enter a block without the root (L2P's frozen query calls the encoder first thing
    # in a step): a block reached first would make itself a root. FSDP2 initialises the root lazily
    # on its first forward and has no public call for it, hence the private one.
    module.backbone._get_fsdp_state()._lazy_init()
    # transformers' generate() then runs synced_gpus: ranks keep forwarding until all have finished
    module.backbone._is_fsdp_managed_module = True
    sharded = [p for b in units for p in b.parameters() if isinstance(p, DTensor)]
    return sum(p.to_local().numel() for p in sharded), sum(p.numel() for p in sharded), len(units)


class ReplicatedGradients(L.Callback):
    """Average the replicated parameters' gradients over the ranks before each optimizer step (what
    DDP would do for them; FSDP reduces only the parameters it shards, and here none trains)."""

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not distributed():
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return
        # one flat all-reduce; a parameter without a gradient here counts as zero (every rank must
        # send the same layout) and keeps None if no rank had one
        grads = all_reduce_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], mean=True)
        for p, g in zip(params, grads):
            if p.grad is not None or g.any():
                p.grad = g.clone()


def callbacks(trainer) -> list[L.Callback]:
    """The callbacks a Trainer needs for ``module``'s FSDP run (none under other strategies)."""
    if trainer is None or not is_fsdp(trainer.strategy) or any(isinstance(c, ReplicatedGradients)
                                                                 for c in trainer.callbacks):
        return []  # (the test after a fit asks again)
    return [ReplicatedGradients()]
