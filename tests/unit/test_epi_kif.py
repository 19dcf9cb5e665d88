"""EPI's and KIF-LoRA's defining mechanisms on known tensors (their runs end to end on both backbone
families, and their exact resume, are in tests/integration/test_methods_e2e.py).

EPI: class statistics, Mahalanobis task identification, one-hot routing (only the chosen branch
contributes; the task being learned trains its branch alone), features of the frozen backbone.
KIF-LoRA: second-order sensitivity, rank-1 unit importance, softmax-weighted fusion per unit, the
orthogonality term, the remembered importance."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gainlora.data.collate import Collator
from gainlora.data.demo import make_demo_task
from gainlora.methods import EPI, KIFLoRA
from gainlora.methods.epi import class_statistics
from gainlora.model.features import frozen_pooled
from gainlora.methods.kiflora import SecondOrderImportance, normalise_units, unit_scores
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.module import ContinualLM


def round_trip(tensors: dict, tmp_path: Path) -> dict:
    path = tmp_path / "memory.safetensors"
    save_file(tensors, str(path))
    return load_file(str(path))


# -- EPI: statistics and identification ---------------------------------------------------------------
def test_epi_statistics_are_class_means_and_the_average_class_covariance() -> None:
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [10.0, 3.0], [5.0, 5.0]], dtype=torch.float64)
    keys = ["a", "a", "b", "b", "c"]  # "c" has one example: a mean, no covariance
    means, cov = class_statistics(feats, keys, max_classes=8)
    assert torch.equal(means, torch.tensor([[1.0, 0.0], [10.0, 2.0], [5.0, 5.0]], dtype=torch.float64))
    # unbiased covariances: a -> [[2, 0], [0, 0]], b -> [[0, 0], [0, 2]]; their mean
    assert torch.allclose(cov, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # more distinct answers than max_classes (a generation task): one class, the task's own statistics
    means, cov = class_statistics(feats, keys, max_classes=2)
    assert torch.allclose(means, feats.mean(0, keepdim=True)) and torch.allclose(cov, torch.cov(feats.T))


def epi_with(means: list[torch.Tensor], covs: list[torch.Tensor]) -> EPI:
    method = EPI()
    method.means = [m.double() for m in means]
    method.cov_sum = sum(c.double() for c in covs)
    return method


def test_epi_identifies_the_task_by_mahalanobis_distance_to_its_nearest_class(tmp_path) -> None:
    # Shared covariance stretched along x: (x - mu)^T S^-1 (x - mu) with S = diag(100, 1) averaged over
    # the two tasks. Task 0's classes at (0, 0) and (0, 10); task 1's one class at (3, 2).
    covs = [torch.diag(torch.tensor([100.0, 1.0])), torch.diag(torch.tensor([100.0, 1.0]))]
    method = epi_with([torch.tensor([[0.0, 0.0], [0.0, 10.0]]), torch.tensor([[3.0, 2.0]])], covs)
    x = torch.tensor([[8.0, 0.0],    # Euclidean: task 1 (5.4 vs 8); Mahalanobis: task 0 (0.64 vs 4.25)
                      [0.0, 9.0],    # task 0's second class (0 + 1), not its first (81)
                      [3.0, 2.5]], dtype=torch.float64)
    assert method.identify(x).tolist() == [0, 0, 1]
    P = torch.linalg.pinv(torch.diag(torch.tensor([100.0, 1.0], dtype=torch.float64)))
    assert torch.allclose(method.precision(), P)
    resumed = EPI()
    resumed.load_memory_tensors(round_trip(method.memory_tensors(), tmp_path))
    assert torch.equal(resumed.precision(), method.precision()) and resumed.identify(x).tolist() == [0, 0, 1]


def tiny_module(backbone) -> ContinualLM:
    torch.manual_seed(0)
    return ContinualLM(backbone, rank=2, alpha=4, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))


def nonzero_branches(module: ContinualLM, n: int) -> None:
    """n branches whose B are not zero, so each one changes the output."""
    for _ in range(n):
        module.add_branch()
        with torch.no_grad():
            for layer in module.adapted.values():
                layer.lora_B.normal_(0, 0.5)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_epi_routes_one_branch_per_example_and_reads_the_frozen_backbone(family, t5_backbone, llama_backbone) -> None:
    backbone = (t5_backbone if family == "t5" else llama_backbone)()
    module, method = tiny_module(backbone), EPI()
    method.setup(module, 2)
    nonzero_branches(module, 2)
    collator = Collator(backbone.tokenizer, backbone.kind, 64, 8)
    task = make_demo_task("demo_colour", n_train=4, n_val=0, n_test=4)
    batch = collator.train_batch(task.train)
    module.eval()
    with torch.no_grad():
        # the task being learned (statistics only for task 0): its branch alone, for every example
        assert torch.equal(module.gate_coefficients(batch), torch.tensor([[0.0, 1.0]] * 4))
        loss_routed = module(batch)
        for layer in module.adapted.values():
            layer.frozen_B.zero_()  # branch 0 made a no-op: nothing changes if it was off
        assert torch.allclose(module(batch), loss_routed)
        # frozen features: the branches are off, so they equal those of the model with every B zero
        feats = frozen_pooled(module, batch)
        for layer in module.adapted.values():
            layer.lora_B.zero_()
        module.router = None
        assert torch.allclose(feats, frozen_pooled(module, batch), atol=1e-6)
    # with statistics for every branch, the identified task's one-hot coefficients
    method.means = [torch.zeros(1, feats.shape[1], dtype=torch.float64), feats[:2].clone()]
    method.cov_sum = torch.eye(feats.shape[1], dtype=torch.float64)
    module.router = functools.partial(method.route, module)
    with torch.no_grad():
        coeffs = module.gate_coefficients(batch)
    expected = torch.nn.functional.one_hot(method.identify(feats), 2).float()
    assert torch.equal(coeffs, expected) and coeffs.sum(1).eq(1).all() and coeffs[:2, 1].eq(1).all()


def test_frozen_features_of_an_example_do_not_depend_on_its_batch_or_padding(llama_backbone) -> None:
    """EPI's statistics come from right-padded training batches (source and answer), its routing
    from left-padded generation batches (source only): an example must get the same features in
    both, and alone (a tiny LLaMA; pooling over the attention mask, answer included, fails this)."""
    backbone = llama_backbone()
    module = tiny_module(backbone)
    nonzero_branches(module, 1)
    collator = Collator(backbone.tokenizer, backbone.kind, 64, 8)
    task = make_demo_task("demo_continent", n_train=0, n_val=0, n_test=4)
    items = [(0, e, "exact_match") for e in task.test]
    module.train()  # dropout must not apply: the features are taken in eval mode
    trained = frozen_pooled(module, collator.train_batch(task.test))
    generated = frozen_pooled(module, collator.eval_batch(items))
    alone = torch.cat([frozen_pooled(module, collator.eval_batch([item])) for item in items])
    assert module.training
    torch.testing.assert_close(generated, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, trained, atol=1e-5, rtol=1e-5)


# -- KIF-LoRA -----------------------------------------------------------------------------------------
def test_kif_sensitivity_is_second_order() -> None:
    p = torch.tensor([2.0], requires_grad=True)
    tracker = SecondOrderImportance(0.5, 0.5, lambda module: {"p": p})
    tracker.on_train_start(None, None)
    for grad in (1.0, 3.0):  # theta g = 2, 6 -> I = |2 - 2| = 0, |6 - 18| = 12
        (p * grad).sum().backward()
        tracker.on_after_backward(None, None)
    tracker.on_train_end(None, None)
    # I_bar: 0, then 6; U_bar: 0, then 0.5 |12 - 6| = 3
    assert tracker.avg_ipt["p"].item() == 6.0 and tracker.avg_unc["p"].item() == 3.0


class Adapted:
    def __init__(self, **layers: GatedLoRALinear) -> None:
        self.adapted = layers


def layer(d_in: int, d_out: int, rank: int) -> GatedLoRALinear:
    return GatedLoRALinear(nn.Linear(d_in, d_out, bias=False), rank=rank, alpha=1.0, context=BranchContext(),
                           stream="encoder")


def test_kif_unit_importance_is_the_mean_of_the_rank_one_outer_product() -> None:
    torch.manual_seed(0)
    model = Adapted(a=layer(3, 4, rank=2))
    model.adapted["a"].add_branch()
    tracker = SecondOrderImportance(0.85, 0.85, lambda m: {})
    tracker.avg_ipt = {"a.A": torch.rand(2, 3), "a.B": torch.rand(4, 2)}
    tracker.avg_unc = {"a.A": torch.rand(2, 3), "a.B": torch.rand(4, 2)}
    s_a = tracker.avg_ipt["a.A"] * tracker.avg_unc["a.A"]
    s_b = tracker.avg_ipt["a.B"] * tracker.avg_unc["a.B"]
    expected = [torch.outer(s_b[:, r], s_a[r]).mean().item() for r in range(2)]
    assert unit_scores(tracker, model)["a"].tolist() == pytest.approx(expected, rel=1e-6)


def test_kif_fuses_each_rank_one_unit_by_a_softmax_of_its_importances(tmp_path) -> None:
    layers = {"a": layer(2, 2, rank=2), "b": layer(2, 2, rank=2)}
    model = Adapted(**layers)
    for lyr in layers.values():
        lyr.add_branch(torch.full((2, 2), 3.0), torch.full((2, 2), 3.0))
    method = KIFLoRA(tau=0.5)
    # unit r's importance = mean(S_A[r, :]) * mean(S_B[:, r]) with S_B all ones: row r of S_A
    imp = {"a": [4.0, 3.0], "b": [2.0, 0.0]}
    method.tracker.avg_ipt = {}
    for k, v in imp.items():
        method.tracker.avg_ipt[f"{k}.A"] = torch.tensor(v)[:, None].expand(2, 2).clone()  # row r: v[r]
        method.tracker.avg_ipt[f"{k}.B"] = torch.ones(2, 2)
    method.tracker.avg_unc = {k: torch.ones(2, 2) for k in method.tracker.avg_ipt}
    method.on_task_end(model, 0, lambda: iter(()))  # first task: kept, importance remembered
    assert {k: v.tolist() for k, v in method.scores.items()} == {"a": [1.0, 0.75], "b": [0.5, 0.0]}
    assert torch.equal(layers["a"].lora_A, torch.full((2, 2), 3.0))
    method.previous = {n: (lyr.lora_A.detach().clone(), lyr.lora_B.detach().clone()) for n, lyr in layers.items()}
    with torch.no_grad():  # "trained" on task 2
        for lyr in layers.values():
            lyr.lora_A.fill_(1.0)
            lyr.lora_B.fill_(1.0)
    imp = {"a": [0.0, 3.0], "b": [4.0, 2.0]}
    for k, v in imp.items():
        method.tracker.avg_ipt[f"{k}.A"] = torch.tensor(v)[:, None].expand(2, 2).clone()
    method.on_task_end(model, 1, lambda: iter(()))
    present = {"a": [0.0, 0.75], "b": [1.0, 0.5]}
    before = {"a": [1.0, 0.75], "b": [0.5, 0.0]}
    for name, lyr in layers.items():
        for r in range(2):
            p, q = present[name][r], before[name][r]
            c = math.exp(p / 0.5) / (math.exp(p / 0.5) + math.exp(q / 0.5))
            want = c * 1.0 + (1 - c) * 3.0
            assert lyr.lora_A[r].tolist() == pytest.approx([want, want])  # row r of A
            assert lyr.lora_B[:, r].tolist() == pytest.approx([want, want])  # column r of B
    mixed = {k: [0.3 * p + 0.7 * q for p, q in zip(present[k], before[k])] for k in present}
    low, high = min(min(v) for v in mixed.values()), max(max(v) for v in mixed.values())
    assert {k: v.tolist() for k, v in method.scores.items()} == {
        k: pytest.approx([(x - low) / (high - low) for x in v]) for k, v in mixed.items()}
    resumed = KIFLoRA()
    resumed.load_memory_tensors(round_trip(method.memory_tensors(), tmp_path))
    assert all(torch.equal(resumed.scores[k], method.scores[k]) for k in method.scores)


def test_kif_orthogonality_term() -> None:
    model = Adapted(a=layer(3, 2, rank=2))
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # A A^T - I = diag(0, 3): norm 3
    B = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # B^T B - I = [[0, 1], [1, 1]]: norm sqrt(3)
    model.adapted["a"].add_branch(A, B)
    reg = KIFLoRA(lambda_orth=0.1).regularizer(model)
    assert reg.item() == pytest.approx(0.1 * (3 + math.sqrt(3)) / 2)
    assert KIFLoRA(lambda_orth=0.0).regularizer(model) is None
    assert normalise_units({"x": torch.tensor([2.0, 2.0])})["x"].tolist() == [0.0, 0.0]
