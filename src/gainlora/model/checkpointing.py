"""Activation (gradient) checkpointing that recomputes the gated branches exactly.

Hugging Face checkpoints each transformer block and recomputes it during the backward pass. The
gate coefficients of a batch are not block inputs: they live in the model's ``BranchContext``
for the duration of the forward and are cleared after it, so a plain recomputation would run the
branches ungated and save other tensors than the forward did. ``context_fn`` (non-reentrant
``torch.utils.checkpoint``) captures the coefficients when each block runs forward and restores
them around its recomputation, so checkpointed training gives the same loss and gradients.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor
from transformers import PreTrainedModel

from gainlora.model.lora import BranchContext


@contextlib.contextmanager
def _coefficients(context: BranchContext, coeffs: Tensor | None) -> Iterator[None]:
    saved = context.coeffs
    context.coeffs = coeffs
    try:
        yield
    finally:
        context.coeffs = saved


def enable_gradient_checkpointing(model: PreTrainedModel, context: BranchContext) -> None:
    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _coefficients(context, context.coeffs)

    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    # Hugging Face also makes the embeddings' output require grad, which only the reentrant variant
    # needs (its checkpointed blocks would otherwise see no input requiring grad); the frozen
    # embeddings would then be backpropagated into for nothing.
    model.disable_input_require_grads()
