"""Soft prompts: the registry next to the LoRA branches, for prompt-based methods (L2P, LFPT5).

A ``Prompter`` is a small module the method attaches to ``ContinualLM.prompter``; it holds prompt
tensors (and keys) and says, per example, which prompt vectors go in front of the input. The model
then runs the backbone on ``inputs_embeds`` instead of ``input_ids`` (``prompted_inputs``):

- T5 (encoder inputs, right-padded): ``[P, x, pad]``;
- decoder-only: the prompt goes right after any left padding, ``[pad, P, x]`` (generation batches
  are left-padded) or ``[P, x, y, pad]`` (training batches are right-padded), so the padding stays
  contiguous on the left for generation, and position ids counted over the mask give the prompt the
  same positions in training, in a batch and alone.

The attention mask gets ones for the prompt, the labels -100 and the gate mask zeros.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gainlora.model.features import frozen_pooled


class Prompter(nn.Module):
    """What a prompt method puts in front of each example: ``prompts(module, batch)`` -> (B, P, d)."""

    def prompts(self, module: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError


def vocabulary_init(embeddings: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Prompt vectors initialised as copies of randomly drawn vocabulary embeddings (Lester et al.
    2021's sampled-vocabulary init; L2P's TRACE port does the same), float32."""
    rows = torch.randint(embeddings.shape[0], (math.prod(shape[:-1]),), generator=generator)
    return embeddings.detach()[rows].float().cpu().reshape(shape).clone()


def leading_pads(mask: Tensor) -> Tensor:
    """Per row, the number of padding positions before its first real token (0 if right-padded)."""
    real = mask.bool()
    first = real.int().argmax(dim=1)
    return torch.where(real.any(dim=1), first, torch.zeros_like(first))


def insert_prompts(embeds: Tensor, mask: Tensor, prompts: Tensor,
                   extras: dict[str, tuple[Tensor, int]] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Put ``prompts`` (B, P, d) before each row's first real token of ``embeds`` (B, L, d).

    ``extras``: name -> (tensor B x L, fill value at prompt positions), e.g. labels with -100.
    Returns the (B, P + L) embeddings, mask and extras.
    """
    batch, length = mask.shape
    width = prompts.shape[1]
    k = leading_pads(mask)[:, None]  # (B, 1)
    j = torch.arange(width + length, device=mask.device)[None]  # new positions
    # new position j holds: padding j (j < k), prompt j - k (k <= j < k + P), token j - P (after)
    in_prompt = (j >= k) & (j < k + width)
    token_index = torch.where(j < k, j, j - width).clamp(0, length - 1)
    prompt_index = (j - k).clamp(0, width - 1)
    gathered = embeds.gather(1, token_index[..., None].expand(batch, -1, embeds.shape[-1]))
    prompt_rows = prompts.to(embeds.dtype).gather(1, prompt_index[..., None].expand(batch, -1, embeds.shape[-1]))
    new_embeds = torch.where(in_prompt[..., None], prompt_rows, gathered)
    new_mask = torch.where(in_prompt, mask.new_ones(()), mask.gather(1, token_index))
    out = {name: torch.where(in_prompt, t.new_full((), fill), t.gather(1, token_index))
           for name, (t, fill) in (extras or {}).items()}
    return new_embeds, new_mask, out


def select_prompts(query: Tensor, keys: Tensor, top_n: int) -> tuple[Tensor, Tensor]:
    """L2P's matching: (indices B x N of the N keys most cosine-similar to each query, highest first;
    their cosine similarities B x N, differentiable in the keys)."""
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (B, M)
    idx = sims.detach().topk(top_n, dim=1).indices
    return idx, sims.gather(1, idx)


class PromptPool(Prompter):
    """L2P's pool: M prompts of L vectors and M keys; each example gets the concatenation of the
    prompts whose keys best match its frozen query (``select_prompts``). ``pull`` holds the last
    training forward's surrogate term, mean over the batch of sum_selected (1 - cos(query, key))."""

    def __init__(self, prompts: Tensor, keys: Tensor, top_n: int) -> None:
        super().__init__()
        self.prompts_ = nn.Parameter(prompts)  # (M, L, d)
        self.keys = nn.Parameter(keys)  # (M, d)
        self.top_n = top_n
        self.pull: Tensor | None = None
        self.last_selection: Tensor | None = None

    def prompts(self, module: nn.Module, batch: dict) -> Tensor:
        query = frozen_pooled(module, batch)
        idx, sims = select_prompts(query, self.keys, self.top_n)
        self.last_selection = idx
        self.pull = (1.0 - sims).sum(1).mean() if self.training else None
        chosen = self.prompts_[idx]  # (B, N, L, d)
        return chosen.reshape(chosen.shape[0], -1, chosen.shape[-1])


class TaskPrompt(Prompter):
    """One prompt (L x d) shared by every example (prompt tuning; LFPT5). ``teacher`` is a frozen copy
    for distillation; ``use_teacher`` makes the model run with it instead."""

    def __init__(self, prompt: Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(prompt)  # (L, d)
        self.register_buffer("teacher", prompt.detach().clone(), persistent=False)
        self.use_teacher = False

    def prompts(self, module: nn.Module, batch: dict) -> Tensor:
        p = self.teacher if self.use_teacher else self.prompt
        return p[None].expand(batch["input_ids"].shape[0], -1, -1)
