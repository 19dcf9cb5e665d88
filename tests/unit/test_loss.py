"""The global token mean: the loss on known tensors, the sampler's token counts, and gradient
accumulation equal to the whole global batch at once (the 2-process cases are in
tests/integration/test_distributed.py)."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import lightning as L
import pytest
import torch

from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.data.token_sampler import GlobalTokenSampler
from gainlora.model.loss import answer_loss_sum, global_token_loss
from gainlora.model.module import ContinualLM


def test_answer_loss_sum_on_known_tensors() -> None:
    # Two rows, vocabulary 3; uniform logits give log 3 per token, a confident right answer ~0.
    logits = torch.zeros(2, 3, 3)
    logits[1, 0] = torch.tensor([0.0, 100.0, 0.0])
    labels = torch.tensor([[2, -100, -100], [1, 0, -100]])
    # seq2seq: tokens (0,0)->2, (1,0)->1 (confident), (1,1)->0: two uniform tokens and one ~0.
    assert answer_loss_sum(logits, labels, causal=False).item() == pytest.approx(2 * math.log(3), rel=1e-6)
    # causal: position i predicts label i + 1, so only (1,0) -> label 0 counts: the confident row
    # scores token 1, not 0, which costs 100.
    assert answer_loss_sum(logits, labels, causal=True).item() == pytest.approx(100.0, rel=1e-6)


def test_global_token_loss_matches_the_model_mean_when_the_batch_is_global(t5_backbone, llama_backbone) -> None:
    """With global_tokens = the batch's own count and one replica, the loss is HF's token mean;
    with replicas R and R times the tokens it is unchanged."""
    for make in (t5_backbone, llama_backbone):
        backbone = make()
        collator = Collator(backbone.tokenizer, backbone.kind, 64, 8)
        examples = make_demo_task("demo_colour", n_train=6, n_val=0, n_test=1).train
        batch = collator.train_batch(examples)
        tokens = sum(collator.answer_tokens(examples))
        causal = backbone.kind == "causal"
        assert tokens == int((batch["labels"][:, 1:] if causal else batch["labels"]).ne(-100).sum())
        reference = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"]).loss
        ours = global_token_loss(backbone.model, {**batch, "global_tokens": tokens, "replicas": 1}, backbone.kind)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
        scaled = global_token_loss(backbone.model, {**batch, "global_tokens": 4 * tokens, "replicas": 4},
                                   backbone.kind)
        torch.testing.assert_close(scaled, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("world,accumulate,n", [(2, 2, 37), (3, 1, 20), (1, 3, 10)])
def test_sampler_counts_the_whole_global_batch(world: int, accumulate: int, n: int) -> None:
    data = list(range(n))
    tokens = [1 + (7 * i) % 5 for i in range(n)]
    batch = 2
    per_rank = [list(GlobalTokenSampler(data, tokens, batch_size=batch, accumulate=accumulate, num_replicas=world,
                                        rank=r, seed=3)) for r in range(world)]
    step = batch * accumulate
    for start in range(0, len(per_rank[0]), step):
        group = [pair for rank in per_rank for pair in rank[start:start + step]]
        assert len({count for _, count in group}) == 1
        assert group[0][1] == sum(tokens[i] for i, _ in group)
    # The same indices as the plain sampler: only the counts are added.
    plain = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=world - 1, shuffle=True, seed=3)
    assert [i for i, _ in per_rank[-1]] == list(plain)


def train(backbone, batch_size: int, accumulate: int, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = ContinualLM(backbone, rank=4, alpha=32, gates={"hidden": 16},
                         optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    # Answers of 1 to 5 words: micro-batches of unequal token counts, where a per-micro-batch mean
    # and the global token mean differ.
    task = make_demo_task("demo_colour", n_train=32, n_val=0, n_test=1)
    task.train = [replace(e, target=" ".join([e.target] * (1 + i % 5))) for i, e in enumerate(task.train)]
    dm = TaskStreamDataModule([task], Collator(backbone.tokenizer, backbone.kind, 64, 8), batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, accumulate_grad_batches=accumulate)
        trainer.fit(module, datamodule=dm)
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_accumulation_equals_the_global_batch_at_once(t5_backbone) -> None:
    whole = train(t5_backbone(), batch_size=8, accumulate=1)
    accumulated = train(t5_backbone(), batch_size=4, accumulate=2)
    assert whole.keys() == accumulated.keys()
    worst = max(((accumulated[k] - whole[k]).norm() / whole[k].norm()).item() for k in whole)
    assert worst <= 1e-5, worst
