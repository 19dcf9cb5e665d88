"""Test-only: per-rank memory of an FSDP step on two CPU processes over gloo, for tests/unit/test_plan.py.

    python sharded_peak.py PORT OUT_DIR OVERRIDE ...   (Hydra overrides, as for gainlora.plan)

Each rank builds the configured module (as tests/support/live_bytes.py does), shards it as a run's
``configure_model`` does (gainlora.fsdp.shard), and writes OUT_DIR/rank<r>.json: ``resident``, the
bytes of its module's tensors (sharded blocks, whole embeddings, head, branches, gates), and
``step``, the peak of live bytes above them over two training steps (``training_step``, backward,
the replicated gradients' all-reduce, AdamW's step), counting the blocks' gathered weights, which
FSDP allocates and frees by resizing storages in place. Run as a script, never inside pytest.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_bytes import LiveBytes, built  # noqa: E402


class ShardedLiveBytes(LiveBytes):
    """Live bytes, also of storages resized in place (``UntypedStorage.resize_`` is no operator, so
    no dispatch mode sees it; torch's MemTracker patches it the same way). DTensor operations are
    left to DTensor, which runs them on local tensors that are counted."""

    def __enter__(self):
        self._resize = original = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int):
            original(storage, size)
            self._sweep()
            self.count(storage)
            self.peak = max(self.peak, self._live)

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        return super().__torch_dispatch__(func, types, args, kwargs)


def main(rank: int, port: str, out_dir: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from hydra import compose, initialize_config_dir
    from torch.distributed.device_mesh import init_device_mesh

    from gainlora.fsdp import ReplicatedGradients, shard
    from gainlora.run import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    module, batch = built(cfg)
    shard(module, init_device_mesh("cpu", (2,)))
    local = [t.to_local() if isinstance(t, DTensor) else t for t in (*module.parameters(), *module.buffers())]
    resident = sum({id(s): s.nbytes() for s in (t.untyped_storage() for t in local)}.values())
    optimizer = module.configure_optimizers()
    module.train()
    with ShardedLiveBytes([*local, *(v for v in batch.values() if isinstance(v, torch.Tensor))]) as live:
        for _ in range(2):
            module.training_step(batch, 0).backward()
            ReplicatedGradients().on_before_optimizer_step(None, module, optimizer)
            optimizer.step()
            optimizer.zero_grad()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"resident": resident, "step": live.peak}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(sys.argv[1], sys.argv[2], sys.argv[3:]), nprocs=2)
