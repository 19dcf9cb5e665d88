"""Test-only: per-rank memory of a DeepSpeed ZeRO step on two CPU processes, for tests/unit/test_plan.py.

    python deepspeed_peak.py STAGE OUT_DIR OVERRIDE ...   (Hydra overrides, as for gainlora.plan)

Trains the configured module (built as tests/support/live_bytes.py builds it) for two steps under
the CPU DeepSpeed shim (tests/support/cpu_deepspeed.py; ZeRO-3 partitions every parameter) with the
strategy section's reduce_bucket_size, or its DeepSpeed ``config`` where it has one (which then
replaces the keyword arguments, as in a run; e.g. ``+strategy.config.zero_optimization.stage=3
+strategy.config.zero_optimization.stage3_prefetch_bucket_size=0``), and each rank writes
OUT_DIR/rank<r>.json: ``resident``, the bytes of its module's parameters (ZeRO-3: their partitions)
and buffers when the first step starts; ``buckets``, the bytes of each gradient bucket DeepSpeed
held at the end of a step; ``step``, the peak of live bytes over the two steps above what existed
when they started (resized storages counted; ZeRO-3's bucket exists by then, ZeRO-2 allocates its
buckets in every step). Run as a script with DS_ACCELERATOR=cpu, never inside pytest: Lightning's
launcher re-runs it for rank 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_deepspeed import CPUDeepSpeedStrategy  # noqa: E402
from live_bytes import built  # noqa: E402
from sharded_peak import ShardedLiveBytes  # noqa: E402


def buckets(trainer) -> list[torch.Tensor]:
    """The ZeRO optimizer's gradient buckets (per dtype; a list of them under ZeRO-2)."""
    found = []
    for bucket in trainer.strategy.model.optimizer.ipg_buckets.values():
        found += [b for b in (bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]) if b is not None]
    return found


class Measure(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.buckets = Path(out_dir), []

    def on_train_batch_start(self, trainer, module, batch, index) -> None:
        if index:
            return
        local = [getattr(p, "ds_tensor", p) for p in module.parameters()]
        self.resident = sum({id(t.untyped_storage()): t.untyped_storage().nbytes()
                             for t in (*local, *module.buffers())}.values())
        held = [*local, *(p.data for p in module.parameters()), *module.buffers(), *buckets(trainer),
                *(v for v in batch.values() if isinstance(v, torch.Tensor))]
        self.live = ShardedLiveBytes(held)
        self.live.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
        self.buckets = [b.numel() * b.element_size() for b in buckets(trainer)]

    def on_train_end(self, trainer, module) -> None:
        self.live.__exit__(None, None, None)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"resident": self.resident, "buckets": self.buckets, "step": self.live.peak}))


def main(stage: int, out_dir: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from gainlora.dist import continual_strategy
    from gainlora.run import CONF_DIR

    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    module, batch = built(cfg)
    section = OmegaConf.to_container(cfg.strategy, resolve=True)
    strategy = continual_strategy(CPUDeepSpeedStrategy)(  # a DeepSpeed config replaces the keywords, as in a run
        stage=stage, logging_batch_size_per_gpu=1, param_persistence_threshold=0, config=section.get("config"),
        reduce_bucket_size=int(section.get("reduce_bucket_size", 2e8)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Measure(out_dir)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 2, batch_size=None))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
