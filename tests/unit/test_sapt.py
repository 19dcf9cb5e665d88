"""SAPT-LoRA's defining mechanisms on known tensors: the attention over tasks, the reflection KL, the
stored targets padded for later tasks, old blocks and keys frozen, and its memories round-tripping."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from gainlora.callbacks.replay_mixer import ReplayMixer
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.methods import SAPTLoRA
from gainlora.methods.sapt import reflection_loss
from gainlora.model.gates import pool_embeddings
from gainlora.model.module import ContinualLM
from gainlora.model.task_attention import TaskAttention

TASKS = ("demo_colour", "demo_parity", "demo_continent")


def by_hand(p0, W1, W2, gamma, beta, keys, tau, eps=1e-5):
    """SAPT's attention written out in float64: q = LN(silu(W2 W1 p0)), a = softmax(K q / tau)."""
    p0, W1, W2, gamma, beta, keys = (x.double() for x in (p0, W1, W2, gamma, beta, keys))
    h = p0 @ W1.T @ W2.T
    h = h / (1 + torch.exp(-h))
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    q = (h - mu) / torch.sqrt(var + eps) * gamma + beta
    s = q @ keys.T / tau
    return torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)


def test_attention_on_a_known_input() -> None:
    """W1 = W2 = I, p0 = (1, 0): h = (silu(1), 0), LayerNorm gives q = c (1, -1) with
    c = (a / 2) / sqrt(a^2 / 4 + eps), a = silu(1); keys (1, 0), (0, 1), (1, 1) and tau = sqrt(2)
    give scores (c, -c, 0) / sqrt(2)."""
    att = TaskAttention(dim=2, hidden=2)
    with torch.no_grad():
        att.query[0].weight.copy_(torch.eye(2))
        att.query[1].weight.copy_(torch.eye(2))
    for key in ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]):
        att.add_gate(key=torch.tensor(key))
    a = 1 / (1 + math.exp(-1))
    c = (a / 2) / math.sqrt(a * a / 4 + 1e-5)
    s = torch.tensor([c, -c, 0.0], dtype=torch.float64) / math.sqrt(2)
    expected = torch.softmax(s, 0)
    got = att(torch.tensor([[1.0, 0.0]]))
    assert got.shape == (1, 3)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert got[0, 0].item() == pytest.approx(0.5760, abs=1e-4)  # e^0.7071 / (e^0.7071 + e^-0.7071 + 1)


@pytest.mark.parametrize("temperature", [1.0, math.sqrt(2)])
def test_attention_matches_the_formula(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    dim, hidden = 8, 5
    att = TaskAttention(dim=dim, hidden=hidden, temperature=temperature, seed=3)
    with torch.no_grad():
        att.query[3].weight.copy_(torch.rand(dim, generator=g) + 0.5)
        att.query[3].bias.copy_(torch.randn(dim, generator=g))
    for _ in range(3):  # two frozen keys, one current
        att.add_gate(generator=g)
    p0 = torch.randn(6, dim, generator=g)
    (keys,) = att.stacked()
    want = by_hand(p0, att.query[0].weight, att.query[1].weight, att.query[3].weight, att.query[3].bias, keys,
                   temperature * math.sqrt(dim))
    got = att(p0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(6))
    assert att.num_frozen == 2 and att.key.requires_grad and not att.frozen_keys.requires_grad


def test_the_query_network_is_seeded() -> None:
    a, b, c = TaskAttention(4, 3, seed=1), TaskAttention(4, 3, seed=1), TaskAttention(4, 3, seed=2)
    assert torch.equal(a.query[0].weight, b.query[0].weight) and torch.equal(a.query[1].weight, b.query[1].weight)
    assert not torch.equal(a.query[0].weight, c.query[0].weight)


def test_max_pool_ignores_padding() -> None:
    embeds = torch.tensor([[[1.0, -2.0], [3.0, -1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool_embeddings(embeds, mask, "max"), torch.tensor([[3.0, -1.0]]))


def test_reflection_loss_on_known_tensors() -> None:
    """softmax(log p) = p; KL(t || p) = sum t log(t / p) with 0 log 0 = 0, averaged over the batch."""
    p = torch.tensor([0.5, 0.25, 0.25])
    target = torch.tensor([0.8, 0.2, 0.0])
    scores = torch.log(p).repeat(2, 1).requires_grad_()
    kl = reflection_loss(scores, target)
    assert kl.item() == pytest.approx(0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.25), abs=1e-6)
    assert reflection_loss(torch.log(target[:2]).repeat(3, 1), target[:2]).item() == pytest.approx(0, abs=1e-7)
    kl.backward()  # d KL / d s = (softmax(s) - t) / B
    torch.testing.assert_close(scores.grad, ((p - target) / 2).repeat(2, 1))


# -- the method on a tiny T5 -----------------------------------------------------------------------
def sapt_run(backbone, steps: int = 3, **kwargs):
    """SAPT-LoRA over three demo tasks, ``steps`` optimizer steps each; the state after every task."""
    torch.manual_seed(0)
    method = SAPTLoRA(per_task=4, max_size=8, hidden=6, **kwargs)
    module = ContinualLM(backbone, rank=2, alpha=4, gates=method.gate_spec,
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))
    data = [make_demo_task(name, n_train=12, n_val=0, n_test=4) for name in TASKS]
    dm = TaskStreamDataModule(data, Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=4)
    method.setup(module, len(TASKS))
    return method, module, dm


def train_task(method, module, dm, t: int, make_trainer, steps: int) -> None:
    dm.set_task(t)
    module.start_task(t, lambda: method.regularizer(module))
    method.on_task_start(module, t, dm.feature_batches)
    make_trainer(steps, method.callbacks()).fit(module, datamodule=dm)
    method.on_task_end(module, t, dm.feature_batches)


def test_sapt_trains_only_the_new_block_key_and_query(t5_backbone, make_trainer) -> None:
    method, module, dm = sapt_run(t5_backbone())
    layer = next(iter(module.adapted.values()))
    saved = []
    for t in range(3):
        train_task(method, module, dm, t, make_trainer, 3)
        saved.append((layer.branch(t)[0].detach().clone(), layer.branch(t)[1].detach().clone(),
                      module.gates.gate(t)["key"].detach().clone()))
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == {*(f"backbone.{name}.lora_{m}" for name in module.adapted for m in "AB"),
                             "gates.key", *(f"gates.query.{k}" for k in module.gates.query.state_dict())}
        for j in range(t):  # finished blocks and keys are bit for bit what their task left
            assert torch.equal(layer.branch(j)[0], saved[j][0]) and torch.equal(layer.branch(j)[1], saved[j][1])
            assert torch.equal(module.gates.gate(j)["key"], saved[j][2])
    # stored targets: task j's mean attention over tasks 0..j
    assert torch.equal(method.targets[0], torch.ones(1))
    for j in (1, 2):
        assert method.targets[j].shape == (j + 1,)
        assert method.targets[j].sum().item() == pytest.approx(1, abs=1e-5)


def test_reflection_regularizer_uses_padded_targets_on_replayed_batches(t5_backbone, make_trainer,
                                                                       monkeypatch) -> None:
    method, module, dm = sapt_run(t5_backbone(), kl_ratio=0.7, frequency=2)
    for t in range(2):
        train_task(method, module, dm, t, make_trainer, 2)
    dm.set_task(2)
    module.start_task(2, lambda: method.regularizer(module))
    method.on_task_start(module, 2, dm.feature_batches)
    make_trainer(1, method.callbacks()).fit(module, datamodule=dm)  # attaches the datamodule
    assert module.global_step == 1 and method.regularizer(module) is None  # not a replay step (frequency 2)
    monkeypatch.setattr(ContinualLM, "global_step", property(lambda self: 4))
    reg = method.regularizer(module)
    expected = 0.0
    for j in (0, 1):
        examples = method.replay_batch(j, 2)
        assert all(e in method.buffer.task_examples(dm, j) for e in examples) and len(examples) == 4
        batch = dm.collator.train_batch(examples)
        target = torch.cat([method.targets[j], torch.zeros(3 - len(method.targets[j]))])
        p0 = module.pooled_embeddings(batch["input_ids"], batch["gate_mask"])
        log_a = torch.log(module.gates(p0).double())
        expected += (target * (torch.log(target.double().clamp_min(1e-300)) - log_a)).sum(-1).mean().item()
    assert reg.item() == pytest.approx(0.7 * expected, rel=1e-5)
    grads = torch.autograd.grad(reg, [module.gates.key, *module.gates.query.parameters()])
    assert all(g.abs().sum() > 0 for g in grads)  # the KL steers the current key and the shared query
    method.kl_ratio = 0.0
    assert method.regularizer(module) is None


def test_replay_batches_are_a_function_of_the_step(t5_backbone, make_trainer) -> None:
    method, module, dm = sapt_run(t5_backbone())
    train_task(method, module, dm, 0, make_trainer, 1)
    dm.set_task(1)
    first = [method.replay_batch(0, s) for s in range(3)]
    assert [method.replay_batch(0, s) for s in range(3)] == first
    assert first[0] == first[1]  # 4 kept examples, batch 4: each slice is the whole permutation
    assert sorted(map(id, first[0])) == sorted(map(id, method.buffer.task_examples(dm, 0)))


def test_memories_round_trip(t5_backbone, make_trainer, tmp_path) -> None:
    method, module, dm = sapt_run(t5_backbone())
    for t in range(2):
        train_task(method, module, dm, t, make_trainer, 2)
    path = tmp_path / "memory.safetensors"
    save_file(method.memory_tensors(), str(path))
    other, fresh, _ = sapt_run(t5_backbone(), seed=5)  # another seed: different query weights
    assert not torch.equal(other.model.gates.query[0].weight, module.gates.query[0].weight)
    other.load_memory_tensors(load_file(str(path)))
    assert other.targets.keys() == {0, 1} and all(torch.equal(other.targets[j], method.targets[j]) for j in (0, 1))
    assert all(torch.equal(other.buffer.indices[j], method.buffer.indices[j]) for j in (0, 1))
    for (name, a), b in zip(module.gates.query.state_dict().items(), fresh.gates.query.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(method.callbacks()[0], ReplayMixer) and method.replay_examples(dm) == []


def test_sapt_refuses_a_model_without_task_attention(t5_backbone) -> None:
    with pytest.raises(ValueError, match="task attention"):
        SAPTLoRA().setup(ContinualLM(t5_backbone(), rank=2), 2)
