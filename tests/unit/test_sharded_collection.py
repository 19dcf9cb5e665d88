"""Feature collection split over a 2-process gloo group gives the one-process covariances.

Under DDP/DeepSpeed each rank collects every world-th batch and the sums are all-reduced, so every
rank ends with the covariances of all the batches, identical across ranks (InfLoRA and gate
initialisation then agree everywhere). Spawned processes, not a Lightning strategy: this isolates
ContinualLM.collect_features.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.model.backbone import load_backbone
from gainlora.model.module import ContinualLM


def collect(path: str, n_train: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    backbone = load_backbone(path)
    module = ContinualLM(backbone, rank=4, alpha=32, gates={"hidden": 16})
    module.add_branch()
    module.gates.add_gate(copy_previous=False)
    dm = TaskStreamDataModule([make_demo_task("demo_colour", n_train=n_train, n_val=0, n_test=1)],
                              Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=4)
    feats = module.collect_features(dm.feature_batches(), max_batches=None, layers=True, gate=True)
    return feats.layers, feats.gate


def worker(rank: int, path: str, n_train: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    alone = collect(path, n_train)  # no process group yet: every batch, as one process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sharded = collect(path, n_train)
    finally:
        dist.destroy_process_group()
    torch.save({"alone": alone, "sharded": sharded}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("n_train", [20, 4], ids=["5-batches", "1-batch"])  # 1 batch: rank 1 draws none
def test_sharded_collection_equals_one_process(tiny_t5_path: Path, tmp_path: Path, n_train: int) -> None:
    mp.spawn(worker, args=(str(tiny_t5_path), n_train, str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone_layers, alone_gate = ranks[0]["alone"]
    assert alone_layers and len(alone_gate) == 3
    for result in ranks:
        layers, gate = result["sharded"]
        assert set(layers) == set(alone_layers)
        for name, cov in alone_layers.items():
            torch.testing.assert_close(layers[name], cov, rtol=1e-10, atol=1e-12)
        for got, want in zip(gate, alone_gate):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Identical on both ranks, bit for bit: the same reduced sums.
    for name in alone_layers:
        assert torch.equal(ranks[0]["sharded"][0][name], ranks[1]["sharded"][0][name])
