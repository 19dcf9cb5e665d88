"""backbone.gradient_checkpointing and backbone.attn_implementation change memory and kernels,
never the loss or the gradients of what trains (two branches, two gates: the gated path)."""
from __future__ import annotations

import pytest
import torch

from gainlora.data.collate import Collator
from gainlora.data.demo import make_demo_task
from gainlora.model.backbone import load_backbone
from gainlora.model.checkpointing import enable_gradient_checkpointing
from gainlora.model.module import ContinualLM


def loss_and_grads(path: str, *, checkpointing: bool = False, attention: str | None = None):
    torch.manual_seed(0)
    backbone = load_backbone(path, attn_implementation=attention)
    module = ContinualLM(backbone, rank=4, alpha=32, gates={"hidden": 16})
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    with torch.no_grad():  # a non-zero old branch, so that the gate coefficients matter
        for layer in module.adapted.values():
            layer.lora_B.normal_(0, 0.1)
    module.add_branch()
    module.gates.add_gate(copy_previous=True)
    with torch.no_grad():  # and a non-zero current B, so that every trainable tensor gets a gradient
        for layer in module.adapted.values():
            layer.lora_B.normal_(0, 0.1)
    if checkpointing:
        enable_gradient_checkpointing(module.backbone, module.context)
    module.train()
    examples = make_demo_task("demo_colour", n_train=6, n_val=0, n_test=1).train
    batch = Collator(backbone.tokenizer, backbone.kind, 64, 8).train_batch(examples)
    loss = module(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["t5", "llama"])
def path(request, tiny_t5_path, tiny_llama_path) -> str:
    return str(tiny_t5_path if request.param == "t5" else tiny_llama_path)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(path: str) -> None:
    loss, grads = loss_and_grads(path)
    loss_ckpt, grads_ckpt = loss_and_grads(path, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)  # the forward is the same computation
    # The backward recomputes and sums in another order: rounding only (measured <= 1.1e-6).
    assert max(relative(grads_ckpt[name], g) for name, g in grads.items()) <= 1e-5


def test_checkpointing_really_recomputes(path: str) -> None:
    """Guards the test above: the blocks are checkpointed (their forward runs again in backward)."""
    backbone = load_backbone(path)
    module = ContinualLM(backbone, rank=4, alpha=32, gates={"hidden": 16})
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    enable_gradient_checkpointing(module.backbone, module.context)
    module.train()
    layer = next(iter(module.adapted.values()))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    batch = Collator(backbone.tokenizer, backbone.kind, 64, 8).train_batch(
        make_demo_task("demo_colour", n_train=2, n_val=0, n_test=1).train)
    loss = module(batch)
    forward = len(calls)
    loss.backward()
    assert len(calls) == 2 * forward


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_implementation_gives_the_same_loss_and_gradients(path: str, attention: str) -> None:
    loss, grads = loss_and_grads(path, attention="eager")
    loss_other, grads_other = loss_and_grads(path, attention=attention)
    torch.testing.assert_close(loss_other, loss, rtol=1e-6, atol=0)
    assert max(relative(grads_other[name], g) for name, g in grads.items()) <= 1e-5
