"""Feature collection: uncentred covariances of a task's inputs, for InfLoRA's A, the gate keys and
the GPM memories; and the frozen backbone's pooled features (EPI's task identification, L2P's query).

Adapted-layer inputs are read by forward pre-hooks on the ``GatedLoRALinear`` layers while the
model runs forward over the task's batches; gate features (p0 and the current gate's hidden
outputs p1 .. p(depth+1)) are computed directly. Under DDP/DeepSpeed rank r takes every world-th batch and the float64 sums are
all-reduced, so every rank ends with the covariances of all batches.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gainlora.dist import shard
from gainlora.fsdp import is_sharded
from gainlora.memory import CovarianceAccumulator
from gainlora.model.lora import GatedLoRALinear

if TYPE_CHECKING:
    from gainlora.model.module import ContinualLM


@dataclass
class Features:
    """Uncentred covariances collected over one task's training inputs."""

    layers: dict[str, Tensor] = field(default_factory=dict)  # adapted layer name -> (d_in x d_in)
    gate: list[Tensor] = field(default_factory=list)  # current gate's [C(p0), C(p1), .., C(p(depth+1))]


class LayerInputs:
    """Accumulates every adapted layer's input covariance over the real tokens of its stream.

    Layers that read the same input tensor (q and v of one attention block) share one accumulator,
    so the input is counted once and the later SVDs are shared.
    """

    def __init__(self, adapted: dict[str, GatedLoRALinear]) -> None:
        self.adapted = adapted
        self.accs: dict[str, CovarianceAccumulator] = {}
        self.masks: dict[str, Tensor] = {}  # stream -> valid-token mask of the batch now running
        self._last: tuple[Tensor | None, CovarianceAccumulator | None] = (None, None)

    @contextmanager
    def hooked(self) -> Iterator[LayerInputs]:
        handles = [layer.register_forward_pre_hook(functools.partial(self._record, name))
                   for name, layer in self.adapted.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def start_batch(self, masks: dict[str, Tensor]) -> None:
        self.masks, self._last = masks, (None, None)

    def _record(self, name: str, layer: GatedLoRALinear, args: tuple) -> None:
        h = args[0]
        last_input, last_acc = self._last
        if h is last_input and self.accs.setdefault(name, last_acc) is last_acc:
            return  # q and v of one attention block read the same input: count it once
        acc = self.accs.get(name) or self.accs.setdefault(name, CovarianceAccumulator(h.shape[-1], h.device))
        acc.update(h[self.masks[layer.stream].bool()])
        self._last = (h, acc)

    def all_reduce(self, device: torch.device) -> None:
        """Sum every adapted layer's accumulator over the ranks, in the same order on every rank.

        Reduced per layer name, never per shared accumulator: a rank that drew no batch has no
        sharing to mirror, and every rank must make the same collective calls. Sharing is restored
        afterwards where this rank saw it, so q and v still share one SVD.
        """
        reduced: dict[int, CovarianceAccumulator] = {}
        out: dict[str, CovarianceAccumulator] = {}
        for name, layer in self.adapted.items():
            local = self.accs.get(name)
            acc = CovarianceAccumulator(layer.in_features, device)
            if local is not None:
                acc.sum.copy_(local.sum)
                acc.count = local.count
            acc.all_reduce()
            if acc.count:  # a layer no batch reached stays absent, as in a single process
                out[name] = reduced.setdefault(id(local), acc) if local is not None else acc
        self.accs = out

    def covariances(self) -> dict[str, Tensor]:
        """One tensor per shared accumulator, so layers reading the same input share it."""
        covs: dict[int, Tensor] = {}
        out = {}
        for name, acc in self.accs.items():
            if id(acc) not in covs:
                covs[id(acc)] = acc.covariance()
            out[name] = covs[id(acc)]
        return out


@torch.no_grad()
def collect_features(model: ContinualLM, batches: Iterable[dict], *, max_batches: int | None, layers: bool,
                     gate: bool) -> Features:
    """Uncentred covariances of adapted-layer inputs and/or the current gate's layer inputs (p0, p1, ...)."""
    feats = Features()
    if not (layers or gate):
        return feats
    inputs = LayerInputs(model.adapted)
    gates = model.gates
    gate_accs = [CovarianceAccumulator(d, model.device) for d in (gates.input_dims() if gate else ())]
    was_training = model.training
    rank, world = shard()
    model.eval()
    seen, first = 0, None
    try:
        with inputs.hooked():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                seen, first = i + 1, batch if first is None else first
                if i % world != rank:
                    continue
                batch = model._to_device(batch)
                if gate:
                    p0 = model.pooled_embeddings(batch["input_ids"], batch["gate_mask"])
                    # the current gate's layer inputs: p0, then p1 .. p(depth+1) (the last one the key's)
                    for acc, x in zip(gate_accs, (p0, *(p[:, -1] for p in gates.features(p0)))):
                        acc.update(x)
                if layers:
                    inputs.start_batch(stream_masks(batch, model.kind))
                    model(batch)
        if layers and world > 1 and seen % world and rank >= seen % world and is_sharded(model):
            model(model._to_device(first))  # FSDP gathers weights in every forward: as many on every rank
    finally:
        model.train(was_training)
    if world > 1:
        if layers:
            inputs.all_reduce(model.device)
        for acc in gate_accs:
            acc.all_reduce()
    feats.layers = inputs.covariances()
    feats.gate = [acc.covariance() for acc in gate_accs]
    return feats


def stream_masks(batch: dict, kind: str) -> dict[str, Tensor]:
    """The real tokens of each stream: the source for the encoder, the answer for the decoder
    (a causal model has one stream, its whole unpadded sequence)."""
    if kind == "causal":
        return {"decoder": batch["attention_mask"]}
    return {"encoder": batch["attention_mask"], "decoder": batch["labels"] != -100}


@torch.no_grad()
def frozen_pooled(model: ContinualLM, batch: dict) -> Tensor:
    """(batch, d) float64: the backbone's last hidden states with every branch off and no
    prompt, in eval mode (no dropout), mean-pooled over the source tokens (``gate_mask``): the T5
    encoder's output, or a causal model's hidden states with positions counted over the mask, so a
    left-padded generation batch and a right-padded training batch give an example the same positions."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    off = torch.zeros(ids.shape[0], model.num_branches, device=ids.device) if model.num_branches else None
    was_training = model.training
    model.eval()
    try:
        with model.context.gating(off):
            if model.kind == "seq2seq":
                hidden = model.backbone.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            else:  # causal attention: the source positions never see the answer tokens after them
                positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
                hidden = model.backbone.base_model(input_ids=ids, attention_mask=mask,
                                                   position_ids=positions).last_hidden_state
    finally:
        model.train(was_training)
    source = batch["gate_mask"].to(torch.float64).unsqueeze(-1)
    return (hidden.double() * source).sum(1) / source.sum(1).clamp_min(1.0)
