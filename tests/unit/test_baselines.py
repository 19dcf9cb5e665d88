"""The other baselines' defining mechanisms on known tensors: EWC's penalty and Fisher, C-LoRA's
penalty, MIGU's gradient mask, the replay buffer, and GainLoRA's gates over IncLoRA and C-LoRA
branches (built from their configs) staying silent on old tasks."""
from __future__ import annotations

import functools
import math

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file, save_file
from torch import nn

from gainlora.callbacks.importance import ImportanceTracker
from gainlora.callbacks.magnitude_mask import MagnitudeMask, magnitude_mask
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.methods import EWC, MIGU, CLoRA, GainLoRA, IncLoRA, Replay, SeqLoRA, TaSL
from gainlora.methods.tasl import consolidate
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.module import ContinualLM
from gainlora.build import build_method
from gainlora.run import CONF_DIR

TASKS = ("demo_colour", "demo_parity", "demo_continent")


def round_trip(tensors: dict, tmp_path) -> dict:
    """Through a safetensors file, as the run directory stores memories."""
    path = tmp_path / "memory.safetensors"
    save_file(tensors, str(path))
    return load_file(str(path))


def tiny_module(backbone, gates=None) -> ContinualLM:
    torch.manual_seed(0)
    return ContinualLM(backbone, rank=2, alpha=4, gates=gates,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))


def demo_datamodule(backbone, n_train: int = 16, tasks=TASKS) -> TaskStreamDataModule:
    data = [make_demo_task(name, n_train=n_train, n_val=0, n_test=4) for name in tasks]
    return TaskStreamDataModule(data, Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=8)


def layer(d_in: int, d_out: int, rank: int, alpha: float = 1.0) -> GatedLoRALinear:
    base = nn.Linear(d_in, d_out, bias=False)
    return GatedLoRALinear(base, rank=rank, alpha=alpha, context=BranchContext(), stream="encoder")


class Adapted:
    """The one attribute of ContinualLM the penalties and the mask read."""

    def __init__(self, **layers: GatedLoRALinear) -> None:
        self.adapted = layers


# -- EWC ----------------------------------------------------------------------------------------------
def test_ewc_penalty_is_the_hand_computed_value(t5_backbone) -> None:
    module = tiny_module(t5_backbone())
    method = EWC(lambda_ewc=10.0)
    method.setup(module, 2)
    method.open_branch(module, 0)
    n_layers = len(module.adapted)
    assert method.regularizer(module) is None  # nothing learned yet
    for name, lyr in module.adapted.items():  # theta = A: 1, B: 2; anchor A: 0, B: 1; F_A = 3, F_B = 5
        with torch.no_grad():
            lyr.lora_A.fill_(1.0)
            lyr.lora_B.fill_(2.0)
        method.fisher[f"{name}.A"] = torch.full_like(lyr.lora_A, 3.0)
        method.anchor[f"{name}.A"] = torch.zeros_like(lyr.lora_A)
        method.fisher[f"{name}.B"] = torch.full_like(lyr.lora_B, 5.0)
        method.anchor[f"{name}.B"] = torch.ones_like(lyr.lora_B)
    lyr = next(iter(module.adapted.values()))
    per_layer = 3 * 1 ** 2 * lyr.lora_A.numel() + 5 * (2 - 1) ** 2 * lyr.lora_B.numel()
    assert all(l.lora_A.numel() == lyr.lora_A.numel() for l in module.adapted.values())
    penalty = method.regularizer(module)
    assert penalty.item() == pytest.approx(0.5 * 10.0 * n_layers * per_layer)
    penalty.backward()  # d/dB = lambda * F_B * (B - B*) = 50
    assert torch.allclose(lyr.lora_B.grad, torch.full_like(lyr.lora_B, 50.0))


def test_ewc_fisher_is_the_mean_squared_batch_gradient_and_accumulates(t5_backbone) -> None:
    backbone = t5_backbone()
    module, dm = tiny_module(backbone), demo_datamodule(backbone)
    method = EWC(max_batches=2, decay=0.5)
    method.setup(module, 2)
    dm.set_task(0)
    method.on_task_start(module, 0, dm.feature_batches)
    with torch.no_grad():
        for lyr in module.adapted.values():
            lyr.lora_B.normal_(0, 0.1)  # B = 0 would leave A without gradient
    module.eval()
    expected: dict[str, torch.Tensor] = {}
    for batch in list(dm.feature_batches())[:2]:  # the same two batches, through loss.backward()
        module.zero_grad()
        module(batch).backward()
        for name, lyr in module.adapted.items():
            for key, p in (("A", lyr.lora_A), ("B", lyr.lora_B)):
                expected[f"{name}.{key}"] = expected.get(f"{name}.{key}", 0) + p.grad ** 2 / 2
    module.zero_grad()
    module.train()
    method.on_task_end(module, 0, dm.feature_batches)
    assert method.fisher.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(method.fisher[key], value, rtol=1e-5, atol=1e-12)
    assert all(l.lora_A.grad is None for l in module.adapted.values())  # autograd.grad leaves .grad alone
    first = {k: v.clone() for k, v in method.fisher.items()}
    method.on_task_end(module, 1, dm.feature_batches)  # same branch, same data: F <- 0.5 F + F
    for key, value in first.items():
        torch.testing.assert_close(method.fisher[key], 1.5 * value, rtol=1e-5, atol=1e-12)
    name, lyr = next(iter(module.adapted.items()))
    assert torch.equal(method.anchor[f"{name}.B"], lyr.lora_B.detach())


def test_ewc_memories_restore_the_exact_penalty(t5_backbone, tmp_path) -> None:
    module = tiny_module(t5_backbone())
    method = EWC(lambda_ewc=3.0)
    method.setup(module, 2)
    method.open_branch(module, 0)
    generator = torch.Generator().manual_seed(1)
    for name, lyr in module.adapted.items():
        for key, p in (("A", lyr.lora_A), ("B", lyr.lora_B)):
            method.fisher[f"{name}.{key}"] = torch.rand(p.shape, generator=generator)
            method.anchor[f"{name}.{key}"] = torch.randn(p.shape, generator=generator)
    resumed = EWC(lambda_ewc=3.0)
    resumed.load_memory_tensors(round_trip(method.memory_tensors(), tmp_path))
    assert torch.equal(resumed.regularizer(module), method.regularizer(module))


# -- C-LoRA -------------------------------------------------------------------------------------------
def test_clora_penalty_on_known_tensors() -> None:
    lyr = layer(3, 2, rank=1, alpha=2.0)  # s = 2
    lyr.add_branch(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0], [2.0]]))
    model = Adapted(l=lyr)
    method = CLoRA(lambda_clora=0.1)
    assert method.regularizer(model) is None  # the first task has no past update
    lyr.add_branch(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[1.0], [1.0]]))
    # past s B1 A1 = 2 [[1,2,3],[2,4,6]], current s B2 A2 = 2 [[1,0,1],[1,0,1]]
    # product = 4 [[1,0,3],[2,0,6]]; squared sum = 16 (1 + 9 + 4 + 36) = 800
    penalty = method.regularizer(model)
    assert penalty.item() == pytest.approx(0.1 * 800)
    penalty.backward()
    assert lyr.lora_A.grad is not None and lyr.frozen_A.grad is None  # only the new branch is pushed
    # where the past update is zero (column 1) the current update is free
    assert lyr.lora_B.grad.abs().sum() > 0


# -- MIGU ---------------------------------------------------------------------------------------------
def test_magnitude_mask_keeps_units_above_the_quantile() -> None:
    mask = magnitude_mask(torch.tensor([1.0, 5.0, 3.0, 2.0]), 0.5)  # median of 1,2,3,5 = 2.5
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert magnitude_mask(torch.tensor([4.0, 4.0]), 0.0).tolist() == [0.0, 0.0]  # ties at the threshold


@pytest.mark.parametrize("combined", [True, False])
def test_migu_masks_gradient_rows_by_output_magnitude(combined: bool) -> None:
    lyr = layer(2, 3, rank=2)  # s = 0.5
    with torch.no_grad():
        lyr.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    lyr.add_branch(torch.eye(2), torch.full((3, 2), 0.1))
    h = torch.tensor([[[1.0, 3.0], [-2.0, 1.0]]])  # one sequence of two tokens
    weights = torch.tensor([1.0, -2.0, 3.0])
    (lyr(h) * weights).sum().backward()  # without the mask
    grad_A, grad_B = lyr.lora_A.grad.clone(), lyr.lora_B.grad.clone()
    assert (grad_A != 0).all() and (grad_B != 0).all()
    lyr.lora_A.grad = lyr.lora_B.grad = None
    callback = MagnitudeMask(0.5, combined=combined)
    model = Adapted(l=lyr)
    callback.on_train_start(None, model)
    loss = (lyr(h) * weights).sum()
    callback.on_before_backward(None, model, loss)  # the step's masks, before its backward
    loss.backward()  # the gradient hooks apply them
    callback.on_after_backward(None, model)
    # A's units: sum |A h| = [1 + 2, 3 + 1] = [3, 4] -> above the median 3.5: unit 1 only
    # B's units, combined: sum |y| with y = W h + 0.05 (h1 + h2) per token:
    #   token 1: [1.2, 6.2, 4.2], token 2: [-2.05, 1.95, -1.05] -> [3.25, 8.15, 5.25] -> unit 1 only
    # B's units, branch only: sum |0.05 (h1 + h2)| = 0.2 + 0.05 for every unit -> none above
    assert torch.equal(lyr.lora_A.grad, grad_A * torch.tensor([[0.0], [1.0]]))
    keep_B = torch.tensor([[0.0], [1.0], [0.0]]) if combined else torch.zeros(3, 1)
    assert torch.equal(lyr.lora_B.grad, grad_B * keep_B)
    assert callback.sums == {}  # reset after every optimizer step
    callback.on_train_end(None, model)
    lyr.lora_A.grad = None
    (lyr(h) * weights).sum().backward()
    assert callback.sums == {} and torch.equal(lyr.lora_A.grad, grad_A)  # hooks removed


def test_migu_masks_the_accumulated_gradient_by_the_step_magnitudes() -> None:
    """Two micro-batches per step: the first one's gradient is held back (zero reaches .grad, so no
    reduction or ZeRO partition sees it unmasked) and released with the second's, both masked by
    the magnitudes of the whole step: the mask of the accumulated gradient."""
    lyr = layer(2, 3, rank=2)
    lyr.add_branch(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.full((3, 2), 0.1))
    hs = [torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[-4.0, 0.5]]])]
    weights = torch.tensor([1.0, -2.0, 3.0])
    for h in hs:  # unmasked accumulated gradient
        (lyr(h) * weights).sum().backward()
    grad_A, grad_B = lyr.lora_A.grad.clone(), lyr.lora_B.grad.clone()
    lyr.lora_A.grad = lyr.lora_B.grad = None
    z = torch.cat([h.reshape(-1, 2) for h in hs]) @ lyr.lora_A.detach().T
    y = torch.cat([lyr(h).detach().reshape(-1, 3) for h in hs])
    keep_A, keep_B = magnitude_mask(z.abs().sum(0), 0.5), magnitude_mask(y.abs().sum(0), 0.5)
    callback, model = MagnitudeMask(0.5), Adapted(l=lyr)
    callback.on_train_start(None, model)
    for accumulating, h in zip((True, False), hs):
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
            _should_accumulate=lambda accumulating=accumulating: accumulating)))
        loss = (lyr(h) * weights).sum()
        callback.on_before_backward(trainer, model, loss)
        loss.backward()
        callback.on_after_backward(trainer, model)
        if accumulating:
            assert not lyr.lora_A.grad.any() and not lyr.lora_B.grad.any()
    assert 0 < keep_A.sum() < 2 and 0 < keep_B.sum() < 3  # the mask drops some units, keeps some
    assert torch.allclose(lyr.lora_A.grad, grad_A * keep_A[:, None])
    assert torch.allclose(lyr.lora_B.grad, grad_B * keep_B[:, None])
    callback.on_train_end(None, model)


def test_migu_masks_from_the_second_task_on() -> None:
    method = MIGU(quantile=0.3)
    assert not any(isinstance(c, MagnitudeMask) for c in method.callbacks())
    method.task = 1
    assert any(isinstance(c, MagnitudeMask) for c in method.callbacks())


# -- TaSL ---------------------------------------------------------------------------------------------
def test_tasl_importance_is_the_smoothed_sensitivity_times_its_uncertainty() -> None:
    p = torch.tensor([2.0], requires_grad=True)
    tracker = ImportanceTracker(0.5, 0.5, lambda module: {"p": p})
    tracker.on_train_start(None, None)
    for grad in (1.0, 3.0):  # I = |p g| = 2, then 6: each step's gradient, read by the tracker's hook
        (p * grad).sum().backward()
        p.grad = None
        tracker.on_after_backward(None, None)
    tracker.on_train_end(None, None)
    # I_bar: 0.5 * 2 = 1, then 0.5 * 1 + 0.5 * 6 = 3.5; U_bar: 0.5 |2 - 1| = 0.5, then 0.25 + 0.5 |6 - 3.5| = 1.5
    assert tracker.scores({"p": p, "q": p}) == {"p": pytest.approx(3.5 * 1.5), "q": 0.0}
    restored = ImportanceTracker(0.5, 0.5, tracker.params)
    restored.load_state_dict(tracker.state_dict())
    assert restored.scores({"p": p}) == tracker.scores({"p": p})


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 1)

    def training_step(self, batch, _):
        x, y = batch
        return ((self.linear(x).float() - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fp16_importance(init_scale: float, steps: int = 4) -> tuple[ImportanceTracker, torch.amp.GradScaler]:
    """TaSL's tracker after fp16 steps whose loss GradScaler multiplies by ``init_scale`` at first."""
    module = Regression()
    tracker = ImportanceTracker(0.5, 0.5, lambda m: {"w": m.linear.weight})
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(4 * steps, 8), torch.randn(4 * steps, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    L.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler)], max_steps=steps,
              callbacks=[tracker], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return tracker, scaler


def test_importance_reads_fp16_gradients_unscaled() -> None:
    # Powers of two scale every gradient exactly, so the averages must not depend on the scale.
    (plain, _), (scaled, _) = fp16_importance(1.0), fp16_importance(2.0 ** 10)
    assert torch.equal(plain.avg_ipt["w"], scaled.avg_ipt["w"]) and plain.avg_ipt["w"].abs().sum() > 0
    assert torch.equal(plain.avg_unc["w"], scaled.avg_unc["w"])
    # 2^24 overflows fp16: GradScaler skips those steps (halving the scale), and so do the averages.
    overflowing, scaler = fp16_importance(2.0 ** 24, steps=16)
    assert scaler.get_scale() < 2.0 ** 24
    assert torch.isfinite(overflowing.avg_ipt["w"]).all() and torch.isfinite(overflowing.avg_unc["w"]).all()


def test_tasl_consolidation_rules() -> None:
    present = {k: torch.full((2,), 1.0) for k in ("both", "before", "now", "neither")}
    previous = {k: torch.full((2,), 3.0) for k in present}
    # top half (strictly above the median): present {both, now}, previous {both, before}
    merged = consolidate(present, previous, {"both": 0.9, "before": 0.1, "now": 0.8, "neither": 0.0},
                         {"both": 0.9, "before": 0.8, "now": 0.1, "neither": 0.0}, top_fraction=0.5)
    assert {k: v[0].item() for k, v in merged.items()} == pytest.approx(
        {"both": 0.3 * 1 + 0.7 * 3, "before": 3.0, "now": 1.0, "neither": 2.0})


def test_tasl_task_end_consolidates_the_branch_and_remembers_importance(tmp_path) -> None:
    layers = {"a": layer(2, 2, rank=1), "b": layer(2, 2, rank=1)}
    model = Adapted(**layers)
    for lyr in layers.values():
        lyr.add_branch(torch.full((1, 2), 3.0), torch.full((2, 1), 3.0))
    method = TaSL(top_fraction=0.5)
    method.tracker.avg_ipt = {k: torch.tensor([v]) for k, v in {"a.A": 4.0, "a.B": 3.0, "b.A": 2.0, "b.B": 1.0}.items()}
    method.tracker.avg_unc = {k: torch.ones(1) for k in method.tracker.avg_ipt}
    method.on_task_end(model, 0, lambda: iter(()))  # first task: kept as it is, importance remembered
    assert method.scores == pytest.approx({"a.A": 1.0, "a.B": 2 / 3, "b.A": 1 / 3, "b.B": 0.0})
    assert torch.equal(layers["a"].lora_A, torch.full((1, 2), 3.0))
    method.previous = {k: p.detach().clone() for k, p in
                       {"a.A": layers["a"].lora_A, "a.B": layers["a"].lora_B,
                        "b.A": layers["b"].lora_A, "b.B": layers["b"].lora_B}.items()}
    with torch.no_grad():  # "trained" on task 2
        for lyr in layers.values():
            lyr.lora_A.fill_(1.0)
            lyr.lora_B.fill_(1.0)
    method.tracker.avg_ipt = {k: torch.tensor([v]) for k, v in {"a.A": 4.0, "a.B": 1.0, "b.A": 3.0, "b.B": 2.0}.items()}
    method.on_task_end(model, 1, lambda: iter(()))
    # important now {a.A, b.A}, before {a.A, a.B}
    assert layers["a"].lora_A[0, 0].item() == pytest.approx(2.4) and layers["a"].lora_B[0, 0].item() == 3.0
    assert layers["b"].lora_A[0, 0].item() == 1.0 and layers["b"].lora_B[0, 0].item() == 2.0
    resumed = TaSL()
    resumed.load_memory_tensors(round_trip(method.memory_tensors(), tmp_path))
    assert resumed.scores == method.scores


# -- replay -------------------------------------------------------------------------------------------
def test_replay_quotas_bound_and_determinism() -> None:
    replay = Replay(SeqLoRA(), per_task=5, max_size=8, seed=3)
    replay.buffer.select(0, 100)
    first = replay.buffer.indices[0].clone()
    assert len(first) == 5 and len(set(first.tolist())) == 5 and first.max() < 100
    replay.buffer.select(1, 100)
    assert [len(v) for v in replay.buffer.indices.values()] == [4, 4]  # 8 // 2
    replay.buffer.select(2, 30)
    assert [len(v) for v in replay.buffer.indices.values()] == [2, 2, 2]  # 8 // 3
    assert sum(len(v) for v in replay.buffer.indices.values()) <= 8
    assert torch.equal(replay.buffer.indices[0], first[:2])  # trimming keeps prefixes of one permutation
    again = Replay(IncLoRA(), per_task=5, max_size=8, seed=3)
    for t, n in ((0, 100), (1, 100), (2, 30)):
        again.buffer.select(t, n)
    assert all(torch.equal(replay.buffer.indices[t], again.buffer.indices[t]) for t in range(3))
    other = Replay(SeqLoRA(), per_task=5, max_size=8, seed=4)
    other.buffer.select(0, 100)
    assert not torch.equal(other.buffer.indices[0], first)


def test_replay_saves_and_restores_its_buffer_and_the_inner_memories(tmp_path) -> None:
    inner = EWC()
    inner.fisher["l.A"], inner.anchor["l.A"] = torch.rand(2, 3), torch.rand(2, 3)
    replay = Replay(inner, per_task=4, max_size=100)
    replay.buffer.select(0, 50)
    replay.buffer.select(1, 50)
    saved = round_trip(replay.memory_tensors(), tmp_path)
    assert saved["replay.task.0"].dtype == torch.int64
    resumed = Replay(EWC(), per_task=4, max_size=100)
    resumed.load_memory_tensors(saved)
    assert resumed.buffer.indices.keys() == {0, 1}
    assert all(torch.equal(resumed.buffer.indices[t], replay.buffer.indices[t]) for t in (0, 1))
    assert torch.equal(resumed.method.fisher["l.A"], inner.fisher["l.A"])


def test_replay_mixes_the_buffer_into_later_fits(t5_backbone, make_trainer) -> None:
    backbone = t5_backbone()
    module, dm = tiny_module(backbone), demo_datamodule(backbone, n_train=12)
    replay = Replay(SeqLoRA(), per_task=3, max_size=4, frequency=2)
    replay.setup(module, 3)
    seen: dict[int, list] = {}
    kept: dict[int, dict[int, list]] = {}  # after task t: the buffer's examples per task
    for t in range(3):
        dm.set_task(t)
        module.current_task = t
        replay.on_task_start(module, t, dm.feature_batches)
        trainer = make_trainer(1, replay.callbacks())
        trainer.fit(module, datamodule=dm)
        seen[t] = list(trainer.train_dataloader.dataset)
        assert dm.replay == []  # cleared when the fit ends
        replay.on_task_end(module, t, dm.feature_batches)
        kept[t] = {j: [dm.tasks[j].train[i] for i in idx.tolist()] for j, idx in replay.buffer.indices.items()}
    assert seen[0] == dm.tasks[0].train  # nothing to replay before the first task
    for t in (1, 2):
        own = dm.tasks[t].train
        assert seen[t][: len(own)] == own
        extra = seen[t][len(own):]
        assert len(extra) == math.ceil(len(own) / 2)  # frequency 2
        # the buffer after task t - 1, round robin over tasks, cycled
        buffer = kept[t - 1]
        order = [buffer[j][k] for k in range(max(map(len, buffer.values()))) for j in sorted(buffer)
                 if k < len(buffer[j])]
        assert [id(e) for e in extra] == [id(order[i % len(order)]) for i in range(len(extra))]
    assert [len(v) for v in kept[0].values()] == [3] and [len(v) for v in kept[1].values()] == [2, 2]


# -- GainLoRA over IncLoRA and C-LoRA branches (paper appendix) ----------------------------------------
def method_from_config(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}", "method.hidden=32"])
    return build_method(cfg)


@pytest.mark.parametrize("name, branches", [("gainlora_inclora", IncLoRA), ("gainlora_clora", CLoRA)])
def test_gainlora_over_other_branches_keeps_new_gates_silent_on_old_tasks(name, branches, t5_backbone,
                                                                           make_trainer) -> None:
    from test_invariants import SILENT, coefficients_on, run_sequence  # the invariants' driver

    method = method_from_config(name)
    assert isinstance(method, GainLoRA) and type(method.branches) is branches and method.name == name
    run = run_sequence(t5_backbone(), method, 2, make_trainer)
    assert run.at_init[1] < SILENT and run.after_training[1] < SILENT
    assert run.old_unchanged == {1: True}
    assert coefficients_on(run.module, run.dm, 1)[:, 1].mean() > 100 * SILENT  # not vacuous
