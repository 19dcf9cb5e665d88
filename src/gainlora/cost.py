"""What a method costs over the frozen backbone: parameters and forward FLOPs (results.json ``cost``).

- ``trainable_params``: the parameters that require a gradient while task t trains (the current
  branch's trained factors, the current gate, anything else a method opens), counted once per task.
- ``added_params``: every parameter the method has added so far, frozen or not (all branches and
  all gates), i.e. what a run directory stores beyond the backbone.
- ``flops_per_token``: matrix-multiply FLOPs per token (2 per multiply-add) that the branches add to
  one forward pass, per token stream: an adapted W (d_out x d_in) with n active branches of rank r
  adds 2 n r (d_in + d_out), on every token of the stream feeding it (T5: source tokens for the
  encoder and for cross-attention values, target tokens for the decoder's other layers).
- ``gate_flops_per_example``: the gates' matrix products, once per example (gates read the pooled
  prompt, not each token): 2 (d h + (L - 1) h^2 + h d) per gate of depth L.
Counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products only), which
tests/unit/test_cost.py checks on a tiny model; elementwise work (gate scaling, SiLU, cosine) is left out.
"""
from __future__ import annotations

from collections import defaultdict

from gainlora.model.module import ContinualLM


def trainable_params(module: ContinualLM) -> int:
    """Parameters that train now (requires_grad): call while a task's branch and gate are open."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def added_params(module: ContinualLM) -> dict[str, int]:
    """Every branch and gate parameter added so far (frozen buffers and the open entries)."""
    branches = sum(sum(t.numel() for t in layer.stacked()) for layer in module.adapted.values())
    gates = sum(t.numel() for t in module.gates.stacked()) if module.gates is not None else 0
    return {"branches": branches, "gates": gates, "total": branches + gates}


def flops_per_token(module: ContinualLM) -> dict[str, int]:
    """Forward matmul FLOPs the active branches add per token of each stream (encoder, decoder)."""
    out: dict[str, int] = defaultdict(int)
    for layer in module.adapted.values():
        out[layer.stream] += 2 * layer.num_branches * layer.rank * (layer.in_features + layer.out_features)
    return dict(out)


def gate_flops_per_example(module: ContinualLM) -> int:
    """Forward matmul FLOPs of the gates for one example (zero without gates); each gate kind counts its own."""
    return module.gates.flops_per_example() if module.gates is not None else 0


def figures(module: ContinualLM, trainable_per_task: dict[str, int | None]) -> dict:
    """results.json's ``cost`` after the latest task (``trainable_per_task``: task name -> count)."""
    return {"trainable_params_per_task": trainable_per_task, "added_params": added_params(module),
            "flops_per_token": flops_per_token(module), "gate_flops_per_example": gate_flops_per_example(module),
            "counting": "params: numel; FLOPs: forward matrix products over the frozen backbone, "
                        "2 per multiply-add (docs/method.md, 'Cost')"}
