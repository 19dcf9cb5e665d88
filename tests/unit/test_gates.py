"""GainLoRA's gates (docs/method.md, "Gate g_i"): p1 = SiLU(G1 p0), p2 = SiLU(G2 p1), b = 4 cos(p2, k),
a = |2 sigmoid(b) - 1|; pooling over the source's own tokens."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from gainlora.data.collate import Collator
from gainlora.data.types import Example
from gainlora.model.gates import GateBank, pool_embeddings
from gainlora.model.module import ContinualLM


def by_hand(p0: Tensor, G1: Tensor, G2: Tensor, key: Tensor) -> Tensor:
    """The gate of docs/method.md written out with elementary operations, in float64."""
    def silu(x: Tensor) -> Tensor:
        return x / (1 + torch.exp(-x))

    p0, G1, G2, key = (x.double() for x in (p0, G1, G2, key))
    p1 = silu(p0 @ G1.T)
    p2 = silu(p1 @ G2.T)
    cos = (p2 @ key) / (p2.pow(2).sum(-1).sqrt() * key.pow(2).sum().sqrt())
    b = 4 * cos
    return (2 / (1 + torch.exp(-b)) - 1).abs()


def test_gate_on_a_known_input() -> None:
    """A case worked out on paper: G1 = I, G2 = I, p0 = (1, 0), k = (1, 1).
    p1 = p2 = (silu(1), 0), cos = 1/sqrt(2), a = |2 sigmoid(4/sqrt(2)) - 1| = tanh(sqrt(2))."""
    bank = GateBank(dim=2, hidden=2)
    bank.add_gate(copy_previous=False, G1=torch.eye(2), G2=torch.eye(2), key=torch.tensor([1.0, 1.0]))
    a = bank(torch.tensor([[1.0, 0.0]]))
    assert a.shape == (1, 1)
    assert a.item() == pytest.approx(math.tanh(math.sqrt(2)), abs=1e-6)
    assert a.item() == pytest.approx(0.888385, abs=1e-6)


def test_gates_match_the_formula_for_every_task() -> None:
    g = torch.Generator().manual_seed(0)
    dim, hidden = 8, 5
    bank = GateBank(dim=dim, hidden=hidden)
    params = []
    for _ in range(3):  # two frozen gates, one current
        p = {"G1": torch.randn(hidden, dim, generator=g), "G2": torch.randn(dim, hidden, generator=g),
             "key": torch.randn(dim, generator=g)}
        bank.add_gate(copy_previous=False, **p)
        params.append(p)
    p0 = torch.randn(6, dim, generator=g)
    coeffs = bank(p0)
    assert coeffs.shape == (6, 3)
    for i, p in enumerate(params):  # columns in task order
        torch.testing.assert_close(coeffs[:, i].double(), by_hand(p0, **p), rtol=1e-6, atol=1e-6)
    assert ((coeffs >= 0) & (coeffs < 1)).all()


def test_coefficient_is_zero_when_p2_is_orthogonal_to_the_key() -> None:
    dim, hidden = 4, 3
    G1 = torch.randn(hidden, dim)
    G2 = torch.randn(dim, hidden)
    G2[2:] = 0  # p2 = SiLU(G2 p1) is exactly 0 in coordinates 2, 3
    bank = GateBank(dim=dim, hidden=hidden)
    bank.add_gate(copy_previous=False, G1=G1, G2=G2, key=torch.tensor([0.0, 0.0, 1.0, -2.0]))
    bank.add_gate(copy_previous=True, key=torch.tensor([1.0, 0.0, 0.0, 0.0]))  # same p2, key not orthogonal
    p0 = torch.randn(5, dim)
    a = bank(p0)
    assert torch.equal(a[:, 0], torch.zeros(5))
    assert (a[:, 1] > 0).all()


def test_new_gate_copies_the_previous_hidden_layers_and_freezes_it_bit_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    bank = GateBank(dim=6, hidden=4)
    bank.add_gate(copy_previous=False, generator=g)
    with torch.no_grad():  # stands in for training
        for p in (bank.G1, bank.G2, bank.key):
            p.add_(torch.randn(p.shape, generator=g))
    first = {k: v.detach().clone() for k, v in bank.gate(0).items()}
    bank.add_gate(copy_previous=True, generator=g)
    assert {n for n, p in bank.named_parameters() if p.requires_grad} == {"G1", "G2", "key"}
    for name in ("G1", "G2", "key"):
        assert torch.equal(bank.gate(0)[name], first[name])
    assert torch.equal(bank.G1, first["G1"]) and torch.equal(bank.G2, first["G2"])
    assert bank.G1.data_ptr() != bank.frozen_G1.data_ptr()  # a copy, not a view of the frozen gate
    bank.add_gate(copy_previous=False, generator=g)
    assert not torch.equal(bank.G1, bank.frozen_G1[-1])


def test_pooling_modes() -> None:
    embeds = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = pool_embeddings(embeds, mask, "mean")
    padded = pool_embeddings(embeds, mask, "padded_mean")
    torch.testing.assert_close(mean[0], embeds[0, :2].mean(0))
    torch.testing.assert_close(padded[0], embeds[0, :2].sum(0) / 3)
    torch.testing.assert_close(mean[1], padded[1])
    torch.testing.assert_close(pool_embeddings(embeds, mask, "max"), torch.stack([embeds[0, 1], embeds[1, 2]]))
    with pytest.raises(ValueError, match="unknown gate pool"):
        pool_embeddings(embeds, mask, "median")


@pytest.mark.parametrize("kind", ["t5", "llama"])  # LLaMA eval batches are left-padded
@pytest.mark.parametrize("pool", ["mean", "padded_mean", "max"])
def test_coefficient_depends_on_the_batch_only_with_padded_mean(t5_backbone, llama_backbone, pool: str,
                                                                kind: str) -> None:
    """An example's coefficient, alone vs batched with a longer example (more padding)."""
    backbone = (t5_backbone if kind == "t5" else llama_backbone)()
    module = ContinualLM(backbone, rank=2, alpha=4, gates={"hidden": 8, "pool": pool})
    torch.manual_seed(0)
    module.gates.add_gate(copy_previous=False)
    module.gates.add_gate(copy_previous=False)
    collator = Collator(backbone.tokenizer, backbone.kind)
    short = Example("Definition: say it.\nInput: kalo\nOutput: ", "x", ("x",))
    long = Example("Definition: say it again, with many more words than before, and then a few more words "
                   "so that the short example gets a lot of padding.\nInput: kalo tibu\nOutput: ", "x", ("x",))
    alone = module.gate_coefficients(collator.eval_batch([(0, short, "rougeL")]))
    batch = collator.eval_batch([(0, short, "rougeL"), (0, long, "rougeL")])
    assert batch["gate_mask"][0].sum() < batch["gate_mask"].shape[1]  # the short example is padded
    batched = module.gate_coefficients(batch)
    difference = (batched[0] - alone[0]).abs().max().item()
    if pool in ("mean", "max"):
        assert difference < 1e-6
    else:
        assert difference > 1e-4


# -- the appendix's variants: depth, width, output function ---------------------------------------------
def by_hand_deep(p0: Tensor, layers: list[Tensor], key: Tensor, output: str) -> Tensor:
    x = p0.double()
    for w in layers:
        x = torch.nn.functional.silu(x @ w.double().T)
    cos = (x @ key.double()) / (x.norm(dim=-1) * key.double().norm())
    return {"abs_2sigmoid": (2 * torch.sigmoid(4 * cos) - 1).abs(), "abs_cos": cos.abs(),
            "sigmoid": torch.sigmoid(4 * cos)}[output]


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("output", ["abs_2sigmoid", "abs_cos", "sigmoid"])
def test_deeper_gates_and_output_functions_match_the_formula(depth: int, output: str) -> None:
    g = torch.Generator().manual_seed(1)
    dim, hidden = 6, 4
    bank = GateBank(dim=dim, hidden=hidden, depth=depth, output=output)
    assert bank.param_names == (*(f"G{i}" for i in range(1, depth + 2)), "key")
    assert bank.input_dims() == (dim, *[hidden] * depth, dim)
    gates = []
    for _ in range(2):
        p = {n: torch.randn(*shape, generator=g) for n, shape in bank.entry_shapes().items()}
        bank.add_gate(copy_previous=False, **p)
        gates.append(p)
    p0 = torch.randn(5, dim, generator=g)
    coeffs = bank(p0)
    for i, p in enumerate(gates):
        want = by_hand_deep(p0, [p[n] for n in bank.layers], p["key"], output)
        torch.testing.assert_close(coeffs[:, i].double(), want, rtol=1e-6, atol=1e-6)
    # every layer input (p1 .. p(depth+1)) is exposed for the memories
    assert [f.shape[-1] for f in bank.features(p0)] == [hidden] * depth + [dim]


def test_a_deeper_gate_is_seeded_and_copied_layer_by_layer() -> None:
    bank = GateBank(dim=6, hidden=4, depth=3)
    bank.add_gate(copy_previous=False, generator=torch.Generator().manual_seed(0))
    first = {k: v.detach().clone() for k, v in bank.gate(0).items()}
    assert {k: tuple(v.shape) for k, v in first.items()} == bank.entry_shapes()
    bank.add_gate(copy_previous=True, generator=torch.Generator().manual_seed(1))
    for name in bank.layers:
        assert torch.equal(bank.gate(1)[name], first[name])
    with pytest.raises(ValueError, match="not a gate parameter"):
        bank.add_gate(copy_previous=False, G9=torch.zeros(1))
