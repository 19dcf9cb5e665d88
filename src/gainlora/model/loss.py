"""One token mean over the global batch, however many devices and accumulation steps share it.

A Hugging Face loss is the token mean of one micro-batch. DDP averages those means over ranks and
Lightning averages them over accumulation steps, which weights a token of a short micro-batch more
than one of a long micro-batch: N devices would then train differently from one. Here each
micro-batch instead returns

    sum of its per-token losses / global_tokens * replicas

where ``global_tokens`` counts the answer tokens of the whole global batch (all ranks, all
accumulation steps; ``gainlora.data.token_sampler`` attaches it) and ``replicas`` = world size x
accumulation steps. DDP's gradient mean divides by the world size and Lightning by the
accumulation steps, so the optimizer sees the gradient of exactly one token mean over the global
batch. The value logged per micro-batch is therefore that micro-batch's share, scaled by
``replicas``: equal to its token mean only when every micro-batch has as many answer tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def answer_loss_sum(logits: Tensor, labels: Tensor, *, causal: bool) -> Tensor:
    """Summed cross-entropy (in float32 at least) of the answer tokens (labels != -100).

    ``causal``: logits at position i predict token i + 1, as in Hugging Face's causal-LM loss;
    seq2seq logits are aligned with their labels.
    """
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 logits: float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def global_token_loss(model: nn.Module, batch: dict, kind: str) -> Tensor:
    """The micro-batch's share of the global batch's token-mean loss (see the module docstring).

    The backbone runs without labels so that it computes no loss of its own; a seq2seq model gets
    the decoder inputs it would have built from them.
    """
    inputs = {"attention_mask": batch["attention_mask"]}
    if batch.get("inputs_embeds") is not None:  # soft prompts inserted (ContinualLM.prompted_inputs)
        inputs["inputs_embeds"] = batch["inputs_embeds"]
    else:
        inputs["input_ids"] = batch["input_ids"]
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = model(**inputs).logits
    total = answer_loss_sum(logits, batch["labels"], causal=kind == "causal")
    return total * (float(batch["replicas"]) / float(batch["global_tokens"]))

