"""results.json's ``cost`` (gainlora.cost): the analytic FLOPs against torch's FlopCounterMode on a
tiny model, and the trainable-parameter counts against what the optimizer of each task holds."""
from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gainlora import cost
from gainlora.artifacts import RunDir
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.loop import ContinualLoop
from gainlora.methods import GainLoRA, IncLoRA, InfLoRA, SeqLoRA
from gainlora.model.module import ContinualLM

TASKS = ("demo_colour", "demo_parity")


def measured(module: ContinualLM, batch: dict) -> int:
    """Every matmul FLOP of one teacher-forced forward, gates included."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), module.gated(batch):
        module.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return counter.get_total_flops()


@pytest.mark.parametrize("gate_kind", ["gainlora", "attention"])
@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_analytic_flops_equal_flop_counter(kind: str, gate_kind: str, t5_backbone, llama_backbone) -> None:
    backbone = (t5_backbone if kind == "t5" else llama_backbone)()
    collator = Collator(backbone.tokenizer, backbone.kind, 128, 8)
    batch = collator.train_batch(make_demo_task("demo_colour", n_train=5, n_val=0, n_test=0).train)
    spec = {"hidden": 12, "depth": 2} if gate_kind == "gainlora" else {"kind": "attention", "hidden": 12}
    module = ContinualLM(backbone, rank=4, gates=spec)
    plain = measured(module, batch)  # no branch, no gate: the frozen backbone alone
    assert cost.flops_per_token(module) == {s: 0 for s in cost.flops_per_token(module)}
    for _ in range(3):
        module.add_branch()
        module.gates.add_gate(copy_previous=False)
    rows = batch["input_ids"].shape[0]
    tokens = ({"encoder": batch["input_ids"].numel(), "decoder": batch["labels"].numel()} if kind == "t5"
              else {"decoder": batch["input_ids"].numel()})
    per_token = cost.flops_per_token(module)
    assert set(per_token) == set(tokens)
    analytic = sum(per_token[s] * tokens[s] for s in tokens) + rows * cost.gate_flops_per_example(module)
    assert measured(module, batch) - plain == analytic
    # the shapes behind it: three branches of rank 4 on each adapted W, three gates d -> 12 -> 12 -> d
    layer = next(iter(module.adapted.values()))
    assert layer.num_branches == 3
    d = module.gates.dim
    assert cost.gate_flops_per_example(module) == (3 * 2 * (d * 12 + 12 * 12 + 12 * d) if gate_kind == "gainlora"
                                                   else 2 * (d * 12 + 12 * d) + 3 * 2 * d)


class OptimizerSize(L.Callback):
    """What the task's optimizer really trains."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def on_train_start(self, trainer, pl_module) -> None:
        self.sizes.append(sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"]))


@pytest.mark.parametrize("method", [lambda: GainLoRA(InfLoRA(), hidden=16), IncLoRA, SeqLoRA],
                         ids=["gainlora_inflora", "inclora", "seqlora"])
def test_results_count_what_each_task_trains(method, t5_backbone, make_trainer, tmp_path) -> None:
    method = method()
    backbone = t5_backbone()
    torch.manual_seed(0)
    module = ContinualLM(backbone, rank=4, gates=method.gate_spec, task_names=list(TASKS),
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    dm = TaskStreamDataModule([make_demo_task(n, n_train=8, n_val=0, n_test=2) for n in TASKS],
                              Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=4)
    sizes: list[int] = []
    loop = ContinualLoop(module=module, datamodule=dm, method=method, run_dir=RunDir(tmp_path), progress_bar=False,
                         make_trainer=lambda t, callbacks, scale=1: make_trainer(2, [*callbacks, OptimizerSize(sizes)]),
                         info={"experiment": "unit", "method": method.name})
    loop.run()
    figures = json.loads(RunDir(tmp_path).results.read_text())["cost"]
    assert list(figures["trainable_params_per_task"].values()) == sizes and len(sizes) == 2
    layers = list(module.adapted.values())
    branch = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    gate = sum(torch.Size(s).numel() for s in module.gates.entry_shapes().values()) if module.gates is not None else 0
    if isinstance(method, GainLoRA):  # InfLoRA trains B only; the gate trains whole
        assert sizes[0] == sum(layer.rank * layer.out_features for layer in layers) + gate
    else:
        assert sizes[0] == branch
    n_branches = 1 if isinstance(method, SeqLoRA) else 2
    assert figures["added_params"] == {"branches": n_branches * branch, "gates": 2 * gate,
                                       "total": n_branches * branch + 2 * gate}
    assert figures["flops_per_token"]["encoder"] > 0 and figures["flops_per_token"]["decoder"] > 0
    assert figures["gate_flops_per_example"] == (2 * 2 * 2 * module.gates.dim * 16 if gate else 0)
