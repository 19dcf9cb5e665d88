"""GainLoRA: a gate per task, constrained so that a new branch stays silent on old tasks.

Wraps a branch method (InfLoRA or O-LoRA) and adds, per docs/method.md:
- the initialization constraint: the new gate copies the previous gate's hidden layers and takes
  as key the top direction of its current-task features outside the old tasks' span;
- the update constraint: after every optimizer step each gate parameter's change is projected off
  the old tasks' span (``GateProjection`` callback);
- gate memories, one per gate parameter (M1, M2, M3 for the paper's gate: the inputs of G1, G2 and
  the key; a deeper gate has one more per hidden layer), grown by GPM after each task.

The reference code's behaviour is a preset, not a switch: conf/method/gainlora_*_reference.yaml.
"""
from __future__ import annotations

from typing import Annotated

import torch
from lightning import Callback
from pydantic import Field
from torch import Tensor

from gainlora.callbacks.gate_projection import GateProjection
from gainlora.memory import Subspace, threshold_at
from gainlora.methods.base import IncLoRA, MaxBatches, Method, Needs, Seed, Stage, Threshold, subspace_tensors
from gainlora.methods.clora import CLoRA
from gainlora.methods.inflora import InfLoRA
from gainlora.methods.olora import OLoRA
from gainlora.model.features import Features
from gainlora.model.gates import Output, Pool
from gainlora.model.module import ContinualLM


class GainLoRA(Method):
    """``branches``: the method that opens, initialises and remembers the LoRA branches, one per task
    (the paper's four; the schema accepts exactly these classes, not subclasses that route or gate).

    ``hidden``, ``depth``: width and number of the gate's hidden layers (the paper: 100, 1);
    ``output``: f in a_i = f(cos(p, k_i)) (``gainlora.model.gates``; ``sigmoid`` breaks the constraints);
    ``pool``: how p0 averages token embeddings (``padded_mean`` is the reference code's);
    ``thresholds``: GPM eps of the gate memories of the first layer (input p0), of every later layer
    (inputs p1, ..) and of the key; ``renorm_rows``: the reference code's
    row renormalisation after the projection (breaks the exact invariance); ``seed``: gate draws.
    """

    def __init__(self, branches: InfLoRA | OLoRA | IncLoRA | CLoRA, *, hidden: Annotated[int, Field(ge=1, le=65536)] = 100,
                 depth: Annotated[int, Field(ge=1, le=16)] = 1, output: Output = "abs_2sigmoid", pool: Pool = "mean",
                 init_constraint: bool = True, update_constraint: bool = True,
                 thresholds: tuple[Threshold, Threshold, Threshold] = (0.995, 0.99999, 0.99999),
                 renorm_rows: bool = False, max_batches: MaxBatches = 100, seed: Seed = 0) -> None:
        super().__init__(max_batches=max_batches)
        self.branches = branches
        self.name = f"gainlora_{branches.name}"
        self.gate_spec = {"hidden": hidden, "depth": depth, "output": output, "pool": pool}
        self.init_constraint, self.update_constraint = init_constraint, update_constraint
        self.thresholds = tuple(float(t) for t in thresholds)
        self.renorm_rows = renorm_rows
        self.seed = seed
        self.gate_memory: list[Subspace] = []
        self.gate_params: tuple[str, ...] = ()  # the gate's parameter names, one per memory (set up)

    def setup(self, model: ContinualLM, num_tasks: int) -> None:
        super().setup(model, num_tasks)
        self.branches.setup(model, num_tasks)
        if model.gates is None:
            raise ValueError("GainLoRA needs a model built with gates (method.gate_spec)")
        if not self.gate_memory:
            self.gate_memory = [Subspace(d) for d in model.gates.input_dims()]
        self.gate_params = model.gates.param_names

    # -- task boundaries ----------------------------------------------------------------------
    def needs(self, stage: Stage) -> Needs:
        # The key is initialised from the current gate's p2 (start); every gate memory grows (end).
        gate = self.init_constraint if stage == "start" else True
        return Needs(layers=self.branches.needs(stage).layers, gate=gate)

    def open_branch(self, model: ContinualLM, task: int) -> None:
        """A new gate (seeded per task; copying the previous gate's G1, G2 under the initialization
        constraint), then the branch method's new branch."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + task)
        model.gates.add_gate(copy_previous=self.init_constraint and task > 0, generator=generator)
        self.branches.open_branch(model, task)

    def init_branch(self, model: ContinualLM, task: int, feats: Features) -> None:
        self.branches.init_branch(model, task, feats)
        if self.init_constraint:
            self._init_key(model, task, feats.gate[-1])

    def _init_key(self, model: ContinualLM, task: int, cov_p2: Tensor) -> None:
        """k_t <- top direction of (C3 - M3 M3^T C3), at the previous key's norm (first: its own)."""
        gates = model.gates
        norm = (gates.frozen_keys[-1] if task > 0 and gates.num_frozen else gates.key).norm()
        direction = self.gate_memory[-1].top_directions(cov_p2, 1)[:, 0]
        with torch.no_grad():
            gates.key.copy_(direction / direction.norm() * norm)

    def update_memories(self, model: ContinualLM, task: int, feats: Features) -> None:
        self.branches.update_memories(model, task, feats)
        for memory, eps, cov in zip(self.gate_memory, self.layer_thresholds(), feats.gate, strict=True):
            memory.update(cov, threshold_at(eps, task, self.num_tasks))

    def layer_thresholds(self) -> list[float]:
        """One eps per gate memory: the first layer's, the later layers' (shared), the key's."""
        first, later, key = self.thresholds
        return [first, *[later] * (len(self.gate_memory) - 2), key]

    # -- training-time hooks --------------------------------------------------------------------
    def regularizer(self, model: ContinualLM) -> Tensor | None:
        return self.branches.regularizer(model)

    def callbacks(self) -> list[Callback]:
        found = self.branches.callbacks()
        if self.update_constraint:
            found.append(GateProjection(self.gate_memory, renorm_rows=self.renorm_rows))  # in param_names order
        return found

    # -- persistence --------------------------------------------------------------------------------
    def memory_tensors(self) -> dict[str, Tensor]:
        gate = subspace_tensors("gate", dict(zip(self.gate_params, self.gate_memory, strict=True)))
        return {**gate, **self.branches.memory_tensors()}

    def load_memory_tensors(self, tensors: dict[str, Tensor]) -> None:
        for i, layer in enumerate(self.gate_params):
            if f"gate.{layer}" in tensors:
                basis = tensors[f"gate.{layer}"]
                self.gate_memory[i] = Subspace(basis.shape[0], basis)
        self.branches.load_memory_tensors(tensors)
