"""Test-only: a few optimizer steps of one LoRA branch and gate on the tiny T5 under a given
strategy, on answers of 1 to 5 words (micro-batches of unequal token counts, where a per-rank
token mean and the global token mean differ). Rank 0 writes the trained tensors as safetensors.

    python train_sharded.py BACKBONE OUT STRATEGY DEVICES BATCH ACCUMULATE STEPS [OPTIMIZER]

STRATEGY: auto, ddp, deepspeed_stage_2 or deepspeed_stage_3 (the CPU shim, DS_ACCELERATOR=cpu, with
the project's DeepSpeed changes, gainlora.dist.continual_strategy), or fsdp. OPTIMIZER: adamw (default) or sgd;
SGD's step is proportional to the gradient, so a gradient off by a constant factor shows in the
weights (AdamW's normalised step would hide most of it).
Run as a script, never inside pytest: Lightning's launcher re-runs this command for rank 1.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import replace

import lightning as L
import torch
from safetensors.torch import save_file

from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.dist import continual_strategy
from gainlora.model.backbone import load_backbone
from gainlora.model.module import ContinualLM


def strategy(name: str):
    if name.startswith("deepspeed_stage_"):
        from cpu_deepspeed import CPUDeepSpeedStrategy

        return continual_strategy(CPUDeepSpeedStrategy)(stage=int(name[-1]), logging_batch_size_per_gpu=1)
    if name == "fsdp":  # conf/strategy/fsdp.yaml
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=int(sys.argv[4]), tensor_parallel_size=1)
    return name


OPTIMIZERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=3e-3),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.05)}


def main(backbone: str, out: str, name: str, devices: int, batch: int, accumulate: int, steps: int,
         optimizer: str = "adamw") -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    loaded = load_backbone(backbone)
    module = ContinualLM(loaded, rank=4, alpha=32, gates={"hidden": 16},
                         optimizer=OPTIMIZERS[optimizer])
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    task = make_demo_task("demo_colour", n_train=64, n_val=0, n_test=1)
    task.train = [replace(e, target=" ".join([e.target] * (1 + i % 5))) for i, e in enumerate(task.train)]
    dm = TaskStreamDataModule([task], Collator(loaded.tokenizer, loaded.kind, 64, 8), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=devices, strategy=strategy(name),
                            logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            accumulate_grad_batches=accumulate)
        trainer.fit(module, datamodule=dm)
    if trainer.global_rank == 0:
        save_file({n: p.detach().float().contiguous().clone() for n, p in module.named_parameters()
                   if p.requires_grad}, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], args[2], *map(int, args[3:7]), *args[7:])
