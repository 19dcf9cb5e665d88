"""Test-only: the peak of live tensor bytes of real training steps, for tests/unit/test_plan.py.

    python tests/support/live_bytes.py [OVERRIDE ...]   (Hydra overrides, as for gainlora.plan)

prints, for tiny T5 and LLaMA without and with gradient checkpointing, the planned step, the
measured peak and their ratio (the test's shape when no override is given).

What CUDA's ``max_memory_allocated`` reports, measured on CPU: every storage an operator creates is
counted from its creation until it is freed, so the figure is exact and repeatable, free of the
allocator's caching and of the resident set's page granularity. It runs the real model on real
tensors through a Lightning Trainer, as a run does (``training_step``, the backward, AdamW's step
and ``zero_grad``), at the configured precision. The planner sizes the same kind of peak on fake
tensors with its own counter (gainlora.plan.LiveBytes); this one is written apart from it on
purpose, so that a fault in the planner's cannot hide in both.

A hand-written dispatch mode, because PyTorch's own trackers do not fit: ``MemTracker``
(torch.distributed._tools.mem_tracker) registers a gradient hook on every parameter a module runs
and raises on a frozen one, which every LoRA backbone is; ``MemoryTracker`` reads an accelerator's
``memory_allocated``; the profiler's memory timeline is deprecated. Storages are counted as
``MemTracker`` counts them: once per storage (views share it), released by a weak-reference
finalizer when the storage dies. Scratch memory that a kernel allocates and frees inside itself is
not seen (CUDA kernels take little; CPU kernels may take more).
"""
from __future__ import annotations

import json
import sys
import weakref

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The test's shape. Small shapes suffice (live bytes are exact, no allocator noise to dwarf), but
# blocks wide enough that checkpointing saves a third or more: at d_model 64 LLaMA's logits dwarf them.
SHAPE = ["experiment=demo", "+backbone.tiny_overrides.d_model=128", "+backbone.tiny_overrides.d_ff=512",
         "+backbone.tiny_overrides.layers=4", "+backbone.tiny_overrides.heads=4", "data.batch_size=4",
         "backbone.max_source_length=64", "backbone.max_target_length=8"]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive; ``peak`` their maximum.
    The storages of ``existing`` (what the step starts with) are not counted, nor their views.
    Deaths are found by sweeping plain weak references before each operator's outputs are counted,
    not by finalizers: a weakref.finalize on every storage of a real step (Python run while torch
    frees a storage) made the process die of a segmentation fault now and then."""

    def __init__(self, existing) -> None:
        super().__init__()
        self._live = self.peak = 0
        self.existing = [t.untyped_storage() for t in existing]  # held, so that their ids stay theirs
        self.skip = set(map(id, self.existing))
        self.counted: dict[int, tuple[weakref.ref, int]] = {}  # id -> (weak reference, bytes)

    @property
    def live(self) -> int:
        self._sweep()
        return self._live

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.counted.items() if ref() is None]:
            self._live -= self.counted.pop(key)[1]

    def count(self, storage: torch.UntypedStorage) -> None:
        """Count ``storage`` at its present size (again, if it was resized) from now until it dies."""
        key = id(storage)  # the storage's Python object lives as long as the storage itself
        if key in self.skip:
            return
        before = self.counted[key][1] if key in self.counted else 0
        self.counted[key] = (weakref.ref(storage), storage.nbytes())
        self._live += storage.nbytes() - before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()  # first: a storage freed since may have left its id to a new one
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.counted and storage.nbytes():
                    self.count(storage)
        self.peak = max(self.peak, self._live)
        return out


def training_batch(collator, batch: int) -> dict:
    """A batch as a run's loader gives it: the framework's collator over examples whose longest
    source and answer fill the configured lengths, and one shorter row (a run's batches are
    padded, so the attention mask is built), with the token sampler's loss normalisers."""
    from gainlora.data.types import Example

    words = " ".join(f"w{i}" for i in range(2 * collator.max_source_length))  # truncated to the limit
    examples = [Example(words if i else "w1 w2", words, (words,)) for i in range(batch)]
    data = collator.train_batch(examples)
    return {**data, "global_tokens": int((data["labels"] != -100).sum()), "replicas": 1}


def built(cfg: DictConfig) -> tuple:
    """The configured module with as many branches and gates as the planner assumes (the last
    task's), and one training batch of the configured shape."""
    from gainlora.build import build_model
    from gainlora.plan import num_tasks

    torch.manual_seed(0)
    module, _, collator = build_model(cfg, ["t"])
    for _ in range(num_tasks(cfg)):
        module.add_branch()
        module.gates.add_gate(copy_previous=False)
    batch = training_batch(collator, cfg.data.batch_size)
    assert batch["input_ids"].shape[1] == cfg.backbone.max_source_length + (
        0 if module.kind == "seq2seq" else cfg.backbone.max_target_length), batch["input_ids"].shape
    return module, batch


def step_peak(cfg: DictConfig, steps: int = 2) -> int:
    """Peak live bytes over ``steps`` real training steps, above what existed before them (frozen
    weights, branches, gates, the batch): from the second step on the optimizer's moments exist
    when the activations peak, the steady state the planner sizes."""
    module, batch = built(cfg)
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    with LiveBytes([*module.parameters(), *module.buffers(), *tensors]) as mode:
        trainer.fit(module, train_dataloaders=loader)
    return mode.peak


def main(overrides: list[str], as_json: bool = False) -> None:
    """Planned against measured for the tiny T5 and LLaMA, with and without checkpointing: a line
    each, or with ``--json`` one JSON object per case (what tests/unit/test_plan.py reads)."""
    from hydra import compose, initialize_config_dir

    from gainlora.plan import plan
    from gainlora.run import CONF_DIR

    torch.set_num_threads(1)
    for backbone in ("tiny_t5_test", "tiny_llama"):
        for checkpointing in ("false", "true"):
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*overrides, f"backbone={backbone}",
                                                   f"backbone.gradient_checkpointing={checkpointing}"])
            p = plan(cfg)
            planned = (p.activations_ckpt if checkpointing == "true" else p.activations) + p.training_state(1, False)
            measured = step_peak(cfg)
            if as_json:
                print(json.dumps({"backbone": backbone, "checkpointing": checkpointing == "true",
                                  "planned": planned, "measured": measured}), flush=True)
            else:
                print(f"{backbone:13s} checkpointing={checkpointing:5s} planned {planned / 2**20:8.2f} MiB  "
                      f"measured {measured / 2**20:8.2f} MiB  ratio {planned / measured:.3f}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    main(args or SHAPE, as_json)
