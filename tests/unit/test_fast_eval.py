"""Fast evaluation: length-sorted batches give the predictions, in dataset order, and the scores that
one-at-a-time generation gives; each task's evaluation set is tokenized once per run; the next
evaluation is scheduled by the answer lengths the last one generated."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.metrics import TaskScores, score
from gainlora.model.lora import BranchContext, GatedLoRALinear
from test_invariants import TASKS, gated_model

N_TEST = 5


def setup(backbone, eval_batch_size: int = 3) -> tuple:
    module = gated_model(backbone)
    module.scores = TaskScores(len(TASKS))
    collator = Collator(backbone.tokenizer, backbone.kind, 128, 8)
    tasks = [make_demo_task(name, n_train=4, n_val=0, n_test=N_TEST) for name in TASKS]
    if backbone.kind == "causal":  # the tiny LLaMA never ends an answer: EOS where its commonest token was
        batch = collator.eval_batch([(j, e, "rougeL") for j, t in enumerate(tasks) for e in t.test])
        with module.gated(batch):
            out = module.backbone.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           max_new_tokens=2, do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
        common = out[:, -1].mode().values.item()
        head = module.backbone.get_output_embeddings().weight
        with torch.no_grad():
            head[backbone.tokenizer.eos_token_id] = 1.05 * head[common]
    dm = TaskStreamDataModule(tasks, collator, batch_size=2, eval_batch_size=eval_batch_size)
    return module, collator, dm


def one_at_a_time(module, collator, dm) -> tuple[list[dict], list[int]]:
    """The reference: every example alone, in dataset order; its answer and its generated tokens."""
    rows, tokens = [], []
    for j, task in enumerate(dm.tasks[: dm.task + 1]):
        for e in task.test:
            (prediction,), (n,) = module._generate(collator.eval_batch([(j, e, task.metric)]))
            rows.append({"task": j, "source": e.source, "prediction": prediction, "references": list(e.references)})
            tokens.append(n)
    return rows, tokens


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_length_sorted_evaluation_keeps_dataset_order_and_scores(kind: str, t5_backbone, llama_backbone,
                                                                  make_trainer) -> None:
    module, collator, dm = setup((t5_backbone if kind == "t5" else llama_backbone)())
    dm.set_task(len(TASKS) - 1)
    module.start_task(len(TASKS) - 1)
    expected, tokens = one_at_a_time(module, collator, dm)
    assert len(set(tokens)) > 1  # answers of several lengths

    for evaluation in range(2):  # the second is scheduled by the first's generated lengths
        schedule = [(it.task, it.index) for it in dm.eval_schedule("test", list(range(len(TASKS))))]
        dataset_order = [(j, i) for j in range(len(TASKS)) for i in range(N_TEST)]
        assert sorted(schedule) == dataset_order and schedule != dataset_order  # a reordering, not a no-op
        make_trainer(callbacks=[]).test(module, datamodule=dm, verbose=False)
        assert module.predictions == expected
        per_task = [[score(p["prediction"], p["references"], "rougeL") for p in expected if p["task"] == j]
                    for j in range(len(TASKS))]
        assert module.test_scores() == pytest.approx([sum(s) / len(s) for s in per_task], abs=1e-9)
    # what the last evaluation generated is what schedules the next one
    assert [n for j in range(len(TASKS)) for n in dm.answer_hints[("test", j)]] == tokens


def test_evaluation_sets_are_tokenized_once_per_run(t5_backbone, monkeypatch) -> None:
    _, collator, dm = setup(t5_backbone())
    calls = []
    encode = collator.eval_items
    monkeypatch.setattr(collator, "eval_items", lambda items, *a: calls.append(items[0][0]) or encode(items, *a))
    for t in range(len(TASKS)):  # after task t every seen task is evaluated
        dm.set_task(t)
        batches = list(dm.test_dataloader())
        assert sum(len(b["index"]) for b in batches) == (t + 1) * N_TEST
    assert calls == list(range(len(TASKS)))  # one tokenization per task, not one per evaluation


def test_schedule_puts_longest_expected_answers_first(t5_backbone) -> None:
    _, _, dm = setup(t5_backbone())
    dm.set_task(1)
    dm.eval_items("test", 0), dm.eval_items("test", 1)
    dm.remember_answer_lengths("test", [(1, 3, 40), (0, 2, 30)])  # as the last evaluation found them
    schedule = dm.eval_schedule("test", [0, 1])
    assert [(it.task, it.index) for it in schedule[:2]] == [(1, 3), (0, 2)]
    keys = [(dm.answer_hints[("test", it.task)][it.index], len(it.ids)) for it in schedule]
    assert keys == sorted(keys, reverse=True)


def test_generation_product_is_the_training_product_bit_for_bit() -> None:
    """Generation runs the branches' sum in place (``keep_z=False``): the same bits as the training
    path's autograd Function, which keeps z = h A^T ungated for its backward; inputs, stacks and gates
    are left as they were, so a second call (the next decoding step) gives the same again."""
    torch.manual_seed(0)
    context = BranchContext()
    # s = 3, not a power of two: a product summed in another order would round differently
    layer = GatedLoRALinear(nn.Linear(16, 12), rank=2, alpha=6.0, context=context, stream="encoder")
    for _ in range(3):
        layer.add_branch(B=torch.randn(12, 2))
    coeffs = torch.rand(4, 3)
    h = torch.randn(4, 7, 16)
    kept = (h.clone(), coeffs.clone(), *(t.clone() for t in layer.stacked()))
    with context.gating(coeffs):
        with torch.no_grad():
            generated = layer(h)
            again = layer(h)
        trained = layer(h.clone().requires_grad_())  # GatedLoRAFunction: the current branch trains
        trained.sum().backward()
        grad_function = layer.lora_B.grad.clone()
        layer.lora_B.grad = None
        layer._forward_autograd(h, layer._expanded_gates(coeffs, h, 3)).sum().backward()  # plain autograd
    assert torch.equal(generated, trained.detach()) and torch.equal(generated, again)
    assert torch.allclose(grad_function, layer.lora_B.grad, atol=1e-5)  # its z was not gated in place
    for before, after in zip(kept, (h, coeffs, *layer.stacked())):
        assert torch.equal(before, after)
