"""The gated multi-branch LoRA layer: y = W h + sum_i a_i(x) * s * B_i A_i h (docs/method.md, "Branches")."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gainlora.data.collate import Collator
from gainlora.data.types import Example
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.module import ContinualLM

D_IN, D_OUT, RANK, ALPHA = 6, 5, 2, 8.0


def make_layer(seed: int = 0) -> tuple[GatedLoRALinear, nn.Linear, BranchContext]:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=True)
    reference = nn.Linear(D_IN, D_OUT, bias=True)
    reference.load_state_dict(base.state_dict())  # an untouched copy of W, b
    context = BranchContext()
    return GatedLoRALinear(base, rank=RANK, alpha=ALPHA, context=context, stream="encoder"), reference, context


def random_branch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return (torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator))


def explicit_sum(reference: nn.Linear, branches: list[tuple[Tensor, Tensor]], h: Tensor, coeffs: Tensor) -> Tensor:
    """W h + b + sum_i a_i s B_i A_i h, one example and one branch at a time, in float64."""
    W, b = reference.weight.double(), reference.bias.double()
    scale = ALPHA / RANK
    out = []
    for x, a in zip(h.double(), coeffs.double()):
        y = x @ W.T + b
        for i, (A, B) in enumerate(branches):
            y = y + a[i] * scale * (x @ A.double().T @ B.double().T)
        out.append(y)
    return torch.stack(out)


def test_no_branch_and_fresh_branch_equal_the_base_layer() -> None:
    layer, reference, context = make_layer()
    h = torch.randn(3, 4, D_IN)
    assert torch.equal(layer(h), reference(h))
    layer.add_branch()  # LoRA init: B = 0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(h), reference(h))
    context.coeffs = torch.rand(3, 1)
    assert torch.equal(layer(h), reference(h))


def test_new_branch_leaves_the_output_unchanged() -> None:
    layer, _, _ = make_layer()
    g = torch.Generator().manual_seed(1)
    layer.add_branch(*random_branch(g))
    h = torch.randn(3, 4, D_IN)
    before = layer(h)
    layer.add_branch()
    torch.testing.assert_close(layer(h), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, D_IN), (4, 7, D_IN)], ids=["tokens", "sequence"])
def test_forward_equals_the_explicit_per_example_sum(shape: tuple[int, ...]) -> None:
    layer, reference, context = make_layer()
    g = torch.Generator().manual_seed(2)
    branches = [random_branch(g) for _ in range(3)]
    for A, B in branches:  # two frozen, one current
        layer.add_branch(A, B)
    assert (layer.num_frozen, layer.num_branches) == (2, 3)
    h = torch.randn(*shape, generator=g)
    coeffs = torch.rand(shape[0], 3, generator=g)
    context.coeffs = coeffs
    torch.testing.assert_close(layer(h).double(), explicit_sum(reference, branches, h, coeffs), rtol=1e-5, atol=1e-5)
    context.coeffs = None  # gate-free baselines: every coefficient is 1
    torch.testing.assert_close(layer(h).double(), explicit_sum(reference, branches, h, torch.ones(shape[0], 3)),
                               rtol=1e-5, atol=1e-5)


def test_expanded_batch_reuses_each_examples_coefficients() -> None:
    """generate() repeats each example's rows consecutively (beams): row j belongs to example j // k."""
    layer, reference, context = make_layer()
    g = torch.Generator().manual_seed(3)
    branches = [random_branch(g) for _ in range(2)]
    for A, B in branches:
        layer.add_branch(A, B)
    beams = 3
    coeffs = torch.rand(2, 2, generator=g)
    h = torch.randn(2 * beams, 5, D_IN, generator=g)
    context.coeffs = coeffs
    expected = explicit_sum(reference, branches, h, coeffs.repeat_interleave(beams, 0))
    torch.testing.assert_close(layer(h).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="multiple"):
        layer(torch.randn(5, 5, D_IN))
    context.coeffs = torch.rand(6, 3)
    with pytest.raises(RuntimeError, match="3 gate coefficients for 2 branches"):
        layer(h)


def test_bf16_autocast_matches_float32_forward_and_gradients() -> None:
    """The fused path under torch.autocast: bf16 products like F.linear's, fp32 parameters and grads."""
    layer, _, context = make_layer()
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        layer.add_branch(*random_branch(g))
    h = torch.randn(4, 6, D_IN, generator=g)
    context.coeffs = torch.rand(4, 3, generator=g)

    def run(autocast: bool) -> tuple[Tensor, list[Tensor]]:
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(h)
        y.float().pow(2).mean().backward()
        return y, [layer.lora_A.grad, layer.lora_B.grad]

    y32, grads32 = run(False)
    y16, grads16 = run(True)
    assert y16.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads16)
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    for got, want in zip(grads16, grads32):
        assert ((got - want).norm() / want.norm()).item() < 3e-2


def test_optimizer_only_sees_the_current_branch() -> None:
    layer, _, context = make_layer()
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        layer.add_branch(*random_branch(g))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    buffers = dict(layer.named_buffers())
    assert buffers["frozen_A"].shape == (2 * RANK, D_IN) and buffers["frozen_B"].shape == (D_OUT, 2 * RANK)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad

    frozen = {n: t.clone() for n, t in layer.named_buffers()}
    base = layer.weight.detach().clone(), layer.bias.detach().clone()
    current = layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    context.coeffs = torch.ones(4, 3)
    layer(torch.randn(4, D_IN)).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.lora_B, current)  # the current branch did learn
    assert all(torch.equal(t, frozen[n]) for n, t in layer.named_buffers())
    assert torch.equal(layer.weight, base[0]) and torch.equal(layer.bias, base[1])


def test_freezing_is_bit_exact() -> None:
    layer, _, _ = make_layer()
    g = torch.Generator().manual_seed(5)
    values = []
    for _ in range(3):
        layer.add_branch()
        with torch.no_grad():  # stands in for training: arbitrary float32 values
            layer.lora_A.copy_(torch.randn(RANK, D_IN, generator=g))
            layer.lora_B.copy_(torch.randn(D_OUT, RANK, generator=g))
        values.append((layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))
    layer.freeze_current()
    assert layer.lora_A is None and layer.num_frozen == 3
    for i, (A, B) in enumerate(values):
        got_A, got_B = layer.branch(i)
        assert torch.equal(got_A, A) and torch.equal(got_B, B)
    state = layer.state_dict()
    assert torch.equal(state["frozen_A"], torch.cat([A for A, _ in values]))
    assert torch.equal(state["frozen_B"], torch.cat([B for _, B in values], 1))


def test_module_trains_only_current_branches_and_gate(t5_backbone) -> None:
    module = ContinualLM(t5_backbone(), rank=RANK, alpha=ALPHA, gates={"hidden": 8})
    for _ in range(2):
        module.add_branch()
        module.gates.add_gate(copy_previous=True)
    expected = {id(p) for layer in module.adapted.values() for p in (layer.lora_A, layer.lora_B)}
    expected |= {id(module.gates.G1), id(module.gates.G2), id(module.gates.key)}
    optimizer = module.configure_optimizers()
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert seen == expected
    assert {id(p) for p in module.trainable_parameters()} == expected


def test_training_runs_with_dropout_active(t5_backbone, make_trainer) -> None:
    """Every module trains in train mode (LoRA and backbone dropout on), whatever the method, as in
    the reference code; the backbone is loaded in eval mode and Lightning keeps submodules' modes."""
    backbone = t5_backbone()
    module = ContinualLM(backbone, rank=RANK, alpha=ALPHA, dropout=0.1)
    module.add_branch()
    examples = [Example(f"Input: kalo {i}\nOutput: ", "yes", ("yes",)) for i in range(4)]
    loader = DataLoader(examples, batch_size=2, collate_fn=Collator(backbone.tokenizer, backbone.kind).train_batch)
    modes: list[bool] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            modes.append(all(m.training for m in pl_module.modules()))

    make_trainer(2, [Probe()]).fit(module, train_dataloaders=loader)
    assert modes == [True, True]
