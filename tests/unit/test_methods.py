"""Methods on known inputs: the task-boundary template, the reference presets, InfLoRA's A, its
cross-attention feature source, and O-LoRA's loss term."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from gainlora.callbacks.gate_projection import GateProjection
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.memory import Subspace
from gainlora.methods import GainLoRA, InfLoRA, Method, OLoRA
from gainlora.methods.base import Needs
from gainlora.model.features import Features
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.module import ContinualLM
from gainlora.build import build_method
from gainlora.run import CONF_DIR


def compose_method(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"method={name}"])


def layer_of(d_in: int, d_out: int, rank: int) -> GatedLoRALinear:
    return GatedLoRALinear(nn.Linear(d_in, d_out, bias=False), rank=rank, alpha=2.0 * rank,
                           context=BranchContext(), stream="encoder")


# -- reference presets ------------------------------------------------------------------------------
# What the removed `reference_compat: true` switch made of each method's defaults (measured on the
# switch before it went): padded_mean pooling, row renormalisation, one eps for all gate memories
# (InfLoRA's own, else the first gate threshold) and, for InfLoRA, cross-attention v from the decoder.
REFERENCE = {"hidden": 100, "pool": "padded_mean", "thresholds": [0.995, 0.995, 0.995], "renorm_rows": True,
             "init_constraint": True, "update_constraint": True, "max_batches": 100}


@pytest.mark.parametrize("branches", ["inflora", "olora"])
def test_reference_preset_spells_out_every_reference_value(branches: str) -> None:
    cfg = compose_method(f"gainlora_{branches}_reference")
    resolved = OmegaConf.to_container(cfg.method, resolve=True)  # what config.yaml records
    assert "reference_compat" not in resolved
    assert {k: resolved[k] for k in REFERENCE} == REFERENCE
    assert resolved["name"] == f"gainlora_{branches}_reference"
    if branches == "inflora":
        assert resolved["branches"]["cross_value_features"] == "decoder"
        assert resolved["branches"]["threshold"] == 0.995
    method = build_method(cfg)
    assert isinstance(method, GainLoRA) and isinstance(method.branches, InfLoRA if branches == "inflora" else OLoRA)
    # the reference gate: one hidden layer of 100, |2 sigmoid(4 cos) - 1|
    assert method.gate_spec == {"hidden": 100, "depth": 1, "output": "abs_2sigmoid", "pool": "padded_mean"}
    assert method.thresholds == (0.995, 0.995, 0.995) and method.renorm_rows
    (projection,) = [c for c in method.callbacks() if isinstance(c, GateProjection)]
    assert projection.renorm_rows
    if branches == "inflora":
        assert method.branches.cross_value_features == "decoder"
    # The paper's preset differs exactly there.
    paper = OmegaConf.to_container(compose_method(f"gainlora_{branches}").method, resolve=True)
    assert (paper["pool"], paper["renorm_rows"], paper["thresholds"]) == ("mean", False, [0.995, 0.99999, 0.99999])


def test_inflora_reference_thresholds_follow_inflora_eps() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=gainlora_inflora_reference", "method.branches.threshold=0.98"])
    assert build_method(cfg).thresholds == (0.98, 0.98, 0.98)


# -- InfLoRA -------------------------------------------------------------------------------------------
def random_covariance(d: int, generator: torch.Generator) -> torch.Tensor:
    X = torch.randn(4 * d, d, generator=generator, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def assert_same_rows_up_to_sign(got: torch.Tensor, want: torch.Tensor) -> None:
    signs = torch.sign((got * want).sum(1, keepdim=True))
    torch.testing.assert_close(got * signs, want, rtol=0, atol=1e-6)


def test_inflora_init_branch_on_known_covariances() -> None:
    """A = (top-r left singular vectors of C - M M^T C)^T / sqrt(3), frozen; B stays zero and trains."""
    d, rank = 8, 3
    g = torch.Generator().manual_seed(0)
    C = random_covariance(d, g)
    M, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    model = SimpleNamespace(adapted={"fresh": layer_of(d, 5, rank), "remembering": layer_of(d, 5, rank)})
    for layer in model.adapted.values():
        layer.add_branch()
    method = InfLoRA()
    method.memories["remembering"] = Subspace(d, M)
    C2 = C.clone()  # another input tensor: the layers do not share a memory
    method.init_branch(model, 1, Features(layers={"fresh": C, "remembering": C2}))

    U_fresh = torch.linalg.svd(C)[0][:, :rank]
    U_rem = torch.linalg.svd(C2 - M @ M.T @ C2)[0][:, :rank]
    for name, U in (("fresh", U_fresh), ("remembering", U_rem)):
        layer = model.adapted[name]
        assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert torch.count_nonzero(layer.lora_B) == 0
        assert_same_rows_up_to_sign(layer.lora_A.double(), U.T / math.sqrt(3))
    # The remembered directions are untouched by the new A.
    assert (model.adapted["remembering"].lora_A.double() @ M).abs().max() < 1e-6


T5_CROSS = "decoder.block.0.layer.1.EncDecAttention"


@pytest.fixture
def t5_features(t5_backbone):
    """A tiny T5 with one open branch, and its collected layer covariances on a demo task."""
    backbone = t5_backbone()
    torch.manual_seed(0)
    module = ContinualLM(backbone, rank=2, alpha=4)
    module.add_branch()
    dm = TaskStreamDataModule([make_demo_task("demo_colour", n_train=8, n_val=0, n_test=0)],
                              Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=4)
    return module, dm.feature_batches


@pytest.mark.parametrize("source", ["encoder", "decoder"])
def test_cross_attention_value_feature_source(t5_features, source: str) -> None:
    """"decoder" (the reference code) initialises EncDecAttention.v from the covariance q reads,
    "encoder" from the encoder output v really reads; the memory follows the same choice."""
    module, batches = t5_features
    feats = module.collect_features(batches(), max_batches=None, layers=True, gate=False)
    q, v = feats.layers[f"{T5_CROSS}.q"], feats.layers[f"{T5_CROSS}.v"]
    assert q.shape == v.shape and not torch.allclose(q, v)  # decoder stream vs encoder output
    method = InfLoRA(cross_value_features=source)
    method.setup(module, 2)
    method.init_branch(module, 0, feats)
    A_q, A_v = module.adapted[f"{T5_CROSS}.q"].lora_A, module.adapted[f"{T5_CROSS}.v"].lora_A
    if source == "decoder":
        assert torch.equal(A_q, A_v)
        assert method.memories[f"{T5_CROSS}.v"] is method.memories[f"{T5_CROSS}.q"]
    else:
        assert not torch.allclose(A_q.abs(), A_v.abs(), atol=1e-3)
        assert method.memories[f"{T5_CROSS}.v"] is not method.memories[f"{T5_CROSS}.q"]
        # v's A spans the top directions of its own input: the encoder output.
        top = torch.linalg.eigh(v)[1][:, -2:].flip(1)
        assert_same_rows_up_to_sign(A_v.double(), top.T / math.sqrt(3))
    method.update_memories(module, 0, feats)
    want = q if source == "decoder" else v
    expected = Subspace(want.shape[0])
    expected.update(want, 0.995)
    torch.testing.assert_close(method.memories[f"{T5_CROSS}.v"].basis.abs(), expected.basis.abs())


# -- O-LoRA --------------------------------------------------------------------------------------------
def test_olora_regularizer_on_known_tensors() -> None:
    """lambda1 * sum_layers sum_{i<t} |A_i A_t^T|_1 + lambda2 * sum_layers (||A_t|| + ||B_t||)."""
    old = layer_of(2, 2, 1)  # one frozen branch, one current
    old.add_branch(torch.tensor([[1.0, 0.0]]), torch.zeros(2, 1))
    old.add_branch(torch.tensor([[0.0, 2.0]]), torch.zeros(2, 1))
    old.add_branch(torch.tensor([[3.0, -4.0]]), torch.tensor([[6.0], [8.0]]))
    first = layer_of(2, 2, 1)  # its first branch: no orthogonality term
    first.add_branch(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [0.0]]))
    model = SimpleNamespace(adapted={"old": old, "first": first})
    # |[1, 0]·[3, -4]| + |[0, 2]·[3, -4]| = 3 + 8 = 11; norms: old 5 + 10, first 1 + 0.
    assert OLoRA(lambda1=0.5, lambda2=0.1).regularizer(model).item() == pytest.approx(0.5 * 11 + 0.1 * 16)
    assert OLoRA(lambda1=0.5, lambda2=0.0).regularizer(model).item() == pytest.approx(5.5)
    assert OLoRA(lambda1=0.0, lambda2=0.0).regularizer(model) is None
    loss = OLoRA(lambda1=1.0, lambda2=0.0).regularizer(model)
    loss.backward()
    assert torch.equal(old.lora_A.grad, torch.tensor([[1.0, -2.0]]))  # sign(A_0 A_t^T) A_0 + ... = [1, 0] - [0, 2]


# -- the task-boundary template --------------------------------------------------------------------------
class Recording(Method):
    def __init__(self, wants: Needs) -> None:
        super().__init__(max_batches=None)
        self.wants, self.calls = wants, []

    def needs(self, stage):
        return self.wants

    def open_branch(self, model, task):
        self.calls.append(("open_branch", task))
        super().open_branch(model, task)

    def init_branch(self, model, task, feats):
        self.calls.append(("init_branch", task, sorted(feats.layers)[:1], len(feats.gate)))

    def update_memories(self, model, task, feats):
        self.calls.append(("update_memories", task, sorted(feats.layers)[:1], len(feats.gate)))


def test_boundaries_call_the_parts_and_collect_only_what_is_needed(t5_features) -> None:
    module, batches = t5_features
    first = sorted(module.adapted)[:1]
    lean = Recording(Needs())
    calls = []
    lean.on_task_start(module, 0, lambda: calls.append("pass") or batches())
    lean.on_task_end(module, 0, lambda: calls.append("pass") or batches())
    assert lean.calls == [("open_branch", 0), ("init_branch", 0, [], 0), ("update_memories", 0, [], 0)]
    assert calls == []  # no feature was needed: the task's batches were never read
    hungry = Recording(Needs(layers=True))
    hungry.on_task_start(module, 1, batches)
    assert hungry.calls == [("open_branch", 1), ("init_branch", 1, first, 0)]


def test_gainlora_opens_a_gate_and_a_branch_and_initialises_both(t5_backbone) -> None:
    """GainLoRA implements the template's parts: open_branch opens gate and branch, init_branch sets
    InfLoRA's A and the key, update_memories grows layer and gate memories."""
    backbone = t5_backbone()
    method = GainLoRA(InfLoRA(), hidden=8)
    torch.manual_seed(0)
    module = ContinualLM(backbone, rank=2, alpha=4, gates=method.gate_spec)
    dm = TaskStreamDataModule([make_demo_task("demo_colour", n_train=8, n_val=0, n_test=0)],
                              Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=4)
    method.setup(module, 2)
    assert method.needs("start") == Needs(layers=True, gate=True) == method.needs("end")
    assert GainLoRA(OLoRA(), init_constraint=False).needs("start") == Needs()
    assert GainLoRA(OLoRA(), init_constraint=False).needs("end") == Needs(gate=True)

    method.open_branch(module, 0)
    assert module.num_branches == 1 and module.gates.num_gates == 1
    key = module.gates.key.detach().clone()
    feats = method.collect(module, dm.feature_batches, method.needs("start"))
    method.init_branch(module, 0, feats)
    assert not torch.equal(module.gates.key, key)  # the initialization constraint's key
    top = torch.linalg.eigh(feats.gate[2])[1][:, -1]
    assert abs(torch.dot(module.gates.key.double(), top).abs() / module.gates.key.norm() - 1) < 1e-5
    assert all(not layer.lora_A.requires_grad for layer in module.adapted.values())  # InfLoRA's A

    method.update_memories(module, 0, method.collect(module, dm.feature_batches, method.needs("end")))
    assert all(m.rank > 0 for m in method.gate_memory)
    assert method.branches.memories and all(s.rank > 0 for s in method.branches.memories.values())


# -- the model's narrow seams ----------------------------------------------------------------------------
def test_collection_hooks_and_gating_leave_nothing_behind(t5_features) -> None:
    module, batches = t5_features
    module.collect_features(batches(), max_batches=1, layers=True, gate=False)
    assert all(not layer._forward_pre_hooks for layer in module.adapted.values())
    batch = next(iter(batches()))
    with pytest.raises(RuntimeError, match="boom"):
        with module.context.gating(torch.ones(4, 1)):
            raise RuntimeError("boom")
    assert module.context.coeffs is None
    with module.gated(batch):  # gate-free model: every coefficient is 1
        assert module.context.coeffs is None
