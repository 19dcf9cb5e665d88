"""Test-only: what FSDP keeps whole, on two CPU processes over gloo.

    python fsdp_residency.py BACKBONE PORT OUT_DIR

Shards a ContinualLM on the tiny T5 as gainlora.fsdp.shard does for a run, then checks that every
block is sharded again (its parameters DTensors, half of them on each rank) after each kind of
forward a run makes: a training step with its backward, feature collection over an odd number of
batches (one rank pads), greedy generation of unequal lengths. Each rank writes OUT_DIR/rank<r>.json
(its own file: two ranks printing to one stdout can interleave on a line); exits non-zero on a
failed check. Run as a script, never inside pytest.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def blocks_sharded(module) -> bool:
    from torch.distributed.tensor import DTensor

    from gainlora.fsdp import blocks

    return all(isinstance(p, DTensor) for b in blocks(module.backbone) for n, p in b.named_parameters()
               if "lora_" not in n)


def main(rank: int, backbone: str, port: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    from gainlora.fsdp import shard
    from gainlora.model.backbone import load_backbone
    from gainlora.model.module import ContinualLM

    torch.manual_seed(0)
    module = ContinualLM(load_backbone(backbone), rank=4, alpha=32, gates={"hidden": 16})
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    local, full, units = shard(module, init_device_mesh("cpu", (2,)))
    checks = {"half_on_each_rank": 2 * local == full, "sharded_after_setup": blocks_sharded(module)}
    tok = module.tokenizer

    def batch(texts: list[str], answers: list[str]) -> dict:
        src = tok(texts, return_tensors="pt", padding=True)
        labels = tok(answers, return_tensors="pt", padding=True).input_ids
        labels[labels == tok.pad_token_id] = -100
        return {"input_ids": src.input_ids, "attention_mask": src.attention_mask, "gate_mask": src.attention_mask,
                "labels": labels}

    module.train()
    module(batch(["a b c", "d e"], ["x", "y z"])).backward()
    checks["sharded_after_backward"] = blocks_sharded(module)
    feats = module.collect_features([batch(["a b c d"], ["x"]) for _ in range(3)], max_batches=None,
                                    layers=True, gate=True)
    checks["sharded_after_collection"] = blocks_sharded(module) and bool(feats.layers)
    # ranks generate for different sources (different lengths): synced_gpus keeps them in step
    out = module.generate(batch(["a b c" if rank else "d"], ["x"]), max_new_tokens=3 + 5 * rank)
    checks["sharded_after_generation"] = blocks_sharded(module) and len(out) == 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "blocks": units, **checks}, f)
    dist.destroy_process_group()
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    mp.spawn(main, args=(sys.argv[1], sys.argv[2], sys.argv[3]), nprocs=2)
