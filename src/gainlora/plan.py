"""Memory planner: ``python -m gainlora.plan experiment=NAME [key=value ...] [--card-gb 24]``.

Prints, before anything is downloaded, the per-device memory of a run's configuration and which
strategies fit a card. Nothing is allocated: the backbone is built from its config alone (a table of
known configs below, since no hub is reachable; a local directory's config.json; or a tiny preset)
under ``FakeTensorMode``, and one training step's forward and backward run there at the configured
per-device batch and lengths. Activations are the peak of the bytes alive during that step beyond
the model (counted per storage at every operator, as CUDA's allocator would count them), less the
gradients of what trains, which the training state holds. The weights, branches, gates and memories
are counted from the same model. tests/unit/test_plan.py checks the training figure against the
peak of live tensor bytes of real steps of tiny shapes on CPU.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode  # shape-only tensors: the planner allocates nothing
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, PretrainedConfig,
                          T5Config)

from gainlora import fsdp
from gainlora.model.backbone import DTYPES, Backbone
from gainlora.model.checkpointing import enable_gradient_checkpointing
from gainlora.model.module import ContinualLM

GIB = 2**30
# Shapes of the paper's backbones, from their config.json files (nothing else of them is needed).
_T5 = dict(vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
           pad_token_id=0, eos_token_id=1)
_LLAMA = dict(vocab_size=32000, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
KNOWN: dict[str, PretrainedConfig] = {
    "google-t5/t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, **_T5),
    "google-t5/t5-3b": T5Config(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32, **_T5),
    "meta-llama/Llama-2-7b-hf": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, **_LLAMA),
    "meta-llama/Llama-2-13b-hf": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                             num_attention_heads=40, num_key_value_heads=40, **_LLAMA),
    "meta-llama/Meta-Llama-3-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8,
                                              **{**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 8192},
                                              rope_theta=500000.0),
}
KNOWN["t5-large"], KNOWN["t5-3b"] = KNOWN["google-t5/t5-large"], KNOWN["google-t5/t5-3b"]
USABLE = 0.9  # of a card: the CUDA context, the allocator's fragmentation and generation take the rest
STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp")


class PlanError(ValueError):
    """A configuration the planner cannot size; the message names the key."""


def backbone_config(cfg: DictConfig) -> PretrainedConfig:
    """The backbone's config without any download."""
    name, tiny = cfg.backbone.get("name_or_path"), cfg.backbone.get("tiny")
    if tiny:
        from gainlora.model.tiny import build_tokenizer, resolve_spec, with_overrides
        from gainlora.model.tiny_models import make_model

        overrides = cfg.backbone.get("tiny_overrides")
        spec = with_overrides(tiny, **overrides) if overrides else resolve_spec(tiny)
        return make_model(spec, build_tokenizer(spec.arch, spec.vocab_size)).config
    if name in KNOWN:
        return KNOWN[name]
    if name and (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name)
    raise PlanError(f"backbone.name_or_path={name}: the planner knows {', '.join(sorted(KNOWN))} "
                    "or a local directory with a config.json")


@dataclass
class Plan:
    """Bytes per device of each part (activations for one training step)."""

    parameters: int        # backbone parameter count
    weights: int           # the frozen backbone
    block_weights: int     # its transformer blocks' share: what FSDP shards
    largest_block: int     # one block's weights, whole while FSDP runs it
    branches: int          # every task's LoRA branch (the last task holds them all)
    gates: int
    memories: int          # GPM bases, upper bound: full-rank bases of every adapted input
    trainable: int         # current branch + gate: parameter count
    collection: int        # float64 covariance sums and results while features are collected
    activations: int
    activations_ckpt: int
    bucket: int = 0        # one DeepSpeed gradient bucket (reduce_bucket_size elements, allocated whole)
    overlap: bool = True   # DeepSpeed's overlap_comm: ZeRO-2 then holds two buckets
    gathered: int = 0      # frozen weights ZeRO-3 keeps gathered: DeepSpeed's live-parameter limit, at most all
    gather_buffer: int = 0  # ZeRO-3's all-gather buffer of one prefetch bucket, beside the copies made of it

    def training_state(self, world: int, sharded: bool) -> int:
        """Gradients and AdamW moments of what trains (fp32), sharded by ZeRO."""
        per = 4 * self.trainable * 3
        return per // world if sharded else per

    def per_device(self, strategy: str, world: int, checkpointing: bool) -> int:
        weights = self.weights
        if strategy == "deepspeed_stage_3":  # partitioned, and gathered up to DeepSpeed's live limit
            weights = weights // world + self.gathered + self.gather_buffer
        if strategy == "fsdp":  # blocks sharded, one gathered at a time; embeddings and head replicated
            weights += self.block_weights // world - self.block_weights + self.largest_block
        resident = weights + self.branches + self.gates + self.memories
        if strategy.startswith("deepspeed"):
            resident += self.bucket * (2 if strategy == "deepspeed_stage_2" and self.overlap else 1)
        # FSDP keeps what trains replicated (gainlora/fsdp.py): its state is not sharded
        training = self.training_state(world, strategy not in ("ddp", "fsdp")) + (
            self.activations_ckpt if checkpointing else self.activations)
        return resident + max(training, self.collection)


def _fake_model(config: PretrainedConfig, kind: str, dtype: torch.dtype, rank: int, gates: dict | None,
                tasks: int, mode: FakeTensorMode) -> ContinualLM:
    with mode:
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        model = auto.from_config(config, dtype=dtype)
        model.requires_grad_(False)
        module = ContinualLM(Backbone(model, None, kind), rank=rank, gates=gates)
        for _ in range(tasks):  # the last task: every older branch and gate frozen beside the current
            module.add_branch()
            if module.gates is not None:
                module.gates.add_gate(copy_previous=False)
    return module


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, and their peak: what
    CUDA's max_memory_allocated would add. Each storage counts once (views share it) until its weak
    reference is found dead, swept before each operator's outputs are counted (not a finalizer:
    Python run while torch frees a storage crashed the measuring twin of this counter now and then);
    the storages of ``existing`` (the model, the batch) are not counted, nor their views (a weight's
    transpose, which autograd saves, is one). Hand-written because torch's MemTracker, the tool for
    this, registers a gradient hook on every parameter a module runs and raises on a frozen one."""

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._live = self.peak = 0
        self.existing = [t.untyped_storage() for t in existing]  # held: their ids stay theirs
        self.skip = {id(s) for s in self.existing}
        self.counted: dict[int, tuple[weakref.ref, int]] = {}  # id -> (weak reference, bytes)

    @property
    def live(self) -> int:
        self._sweep()
        return self._live

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.counted.items() if ref() is None]:
            self._live -= self.counted.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()  # first: a storage freed since may have left its id to a new one
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)  # a storage's Python object lives as long as the storage
                if key not in self.skip and key not in self.counted and storage.nbytes():
                    self.counted[key] = (weakref.ref(storage), storage.nbytes())
                    self._live += storage.nbytes()
        self.peak = max(self.peak, self._live)
        return out


def step_peak(module: ContinualLM, mode: FakeTensorMode, batch: int, source: int, target: int,
              autocast: torch.dtype | None) -> int:
    """Peak bytes of one training step's forward and backward above the model: what it saves,
    its transients (the logits and their float32 copies at the loss), the recomputation of a
    checkpointed block, the gradients. Run on fake tensors: nothing is allocated."""
    kind = module.kind
    length = source if kind == "seq2seq" else source + target
    with mode:
        mask = torch.ones(batch, length, dtype=torch.long)  # a run's batches are padded: masks are built
        data = {"input_ids": torch.zeros(batch, length, dtype=torch.long), "attention_mask": mask, "gate_mask": mask,
                "labels": torch.zeros(batch, target if kind == "seq2seq" else length, dtype=torch.long)}
    amp = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    module.train()
    with mode, LiveBytes([*module.parameters(), *module.buffers(), *data.values()]) as live:
        with amp:  # as Lightning's mixed precision: the forward under autocast, the backward outside
            loss = module({**data, "global_tokens": 1, "replicas": 1})
        loss.backward()
    return live.peak


def activations(cfg: DictConfig, build, autocast: torch.dtype | None) -> tuple[int, int, ContinualLM]:
    """Activation bytes of one step without and with gradient checkpointing: the step's peak less
    the gradients of what trains, which the training state counts (and ZeRO shards)."""
    shape = int(cfg.data.batch_size), int(cfg.backbone.max_source_length), int(cfg.backbone.max_target_length)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    module = build(mode)
    plain = step_peak(module, mode, *shape, autocast)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    checkpointed = build(mode)
    with mode:
        enable_gradient_checkpointing(checkpointed.backbone, checkpointed.context)
    ckpt = step_peak(checkpointed, mode, *shape, autocast)
    grads = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return plain - grads, ckpt - grads, module


def plan(cfg: DictConfig) -> Plan:
    from gainlora.build import build_method

    config = backbone_config(cfg)
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    dtype = DTYPES[cfg.backbone.dtype]
    gates = build_method(cfg).gate_spec
    tasks = num_tasks(cfg)
    autocast = torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") and dtype == torch.float32 else None
    attention = cfg.backbone.get("attn_implementation")
    if attention:
        config._attn_implementation = attention
    with warnings.catch_warnings():  # fake tensors and checkpointing warn about what they are
        warnings.simplefilter("ignore")
        return _plan(cfg, config, kind, dtype, gates, tasks, autocast)


def _plan(cfg: DictConfig, config: PretrainedConfig, kind: str, dtype: torch.dtype, gates: dict | None, tasks: int,
          autocast: torch.dtype | None) -> Plan:
    build = lambda mode: _fake_model(config, kind, dtype, int(cfg.lora.rank), gates, tasks, mode)  # noqa: E731
    plain, checkpointed, module = activations(cfg, build, autocast)
    layers = module.adapted.values()
    inputs = {(name.rsplit(".", 1)[0], layer.stream): layer.in_features for name, layer in module.adapted.items()}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    gate_tensors = [*module.gates.parameters(), *module.gates.buffers()] if module.gates is not None else []
    dims = module.gates.input_dims() if module.gates is not None else ()
    gate_memory = len(dims) * max(dims, default=0) ** 2 * 4  # one square basis bound per gate parameter
    frozen = lambda block: nbytes(p for n, p in block.named_parameters() if "lora_" not in n)  # noqa: E731
    blocks = [frozen(b) for b in fsdp.blocks(module.backbone)]
    # DeepSpeed allocates whole gradient buckets of reduce_bucket_size elements (contiguous_gradients;
    # ZeRO-2 two with overlap_comm). ZeRO-3 keeps frozen weights gathered up to
    # stage3_max_live_parameters, and gathers a prefetch bucket (stage3_prefetch_bucket_size elements)
    # in one flat buffer that it frees only when the last weight copied out of it has been used, so
    # the bucket is held twice meanwhile (measured on two CPU ranks: docs/benchmarks.md, "Memory planner").
    zero = zero_settings(cfg.get("strategy") or {})
    grad = next(p for p in module.parameters() if p.requires_grad).element_size()
    bucket = int(zero["reduce_bucket_size"]) * grad if zero["contiguous_gradients"] else 0
    weights = nbytes(p for n, p in module.backbone.named_parameters() if "lora_" not in n)
    item = DTYPES[cfg.backbone.dtype].itemsize
    live = min(weights, int(zero["stage3_max_live_parameters"]) * item)
    return Plan(
        parameters=sum(p.numel() for n, p in module.backbone.named_parameters() if "lora_" not in n),
        weights=weights,
        block_weights=sum(blocks), largest_block=max(blocks),
        branches=nbytes(t for layer in layers for t in (layer.frozen_A, layer.frozen_B, layer.lora_A, layer.lora_B)),
        gates=nbytes(gate_tensors),
        memories=sum(layer.in_features ** 2 * 4 for layer in layers) + gate_memory,
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        collection=sum(2 * d * d * 8 for d in inputs.values()),
        activations=plain, activations_ckpt=checkpointed, bucket=bucket, overlap=bool(zero["overlap_comm"]),
        gathered=live, gather_buffer=min(live, int(zero["stage3_prefetch_bucket_size"]) * item))


def zero_settings(strategy: Mapping) -> dict:
    """The ZeRO settings a run's strategy section gives DeepSpeed: with a DeepSpeed ``config``
    mapping, its zero_optimization over DeepSpeed's defaults (Lightning then ignores its keyword
    arguments); else Lightning's keyword arguments and defaults, and DeepSpeed's defaults for the
    ZeRO-3 limits, which Lightning does not pass. A config given as a file path is not read."""
    config = strategy.get("config")
    if isinstance(config, Mapping):
        zero = config.get("zero_optimization") or {}
        known = {"reduce_bucket_size": 5e8, "contiguous_gradients": True, "overlap_comm": zero.get("stage") == 3}
    else:
        zero, known = strategy, {"reduce_bucket_size": 2e8, "contiguous_gradients": True, "overlap_comm": True}
    known.update(stage3_max_live_parameters=1e9, stage3_prefetch_bucket_size=5e7)
    return {key: zero.get(key, default) for key, default in known.items()}


def num_tasks(cfg: DictConfig) -> int:
    bench = cfg.benchmark
    names = bench.get("tasks") or (bench.get("orders") or {}).get(bench.get("order")) or []
    return int(bench.get("num_tasks") or len(names) or 1)


def report(cfg: DictConfig, p: Plan, world: int, card_gb: float) -> str:
    gb = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    name = cfg.backbone.get("name_or_path") or f"tiny:{cfg.backbone.tiny}"
    rows = [f"backbone {name}: {p.parameters / 1e9:.2f} B parameters in {cfg.backbone.dtype}; "
            f"{world} device(s) x batch {cfg.data.batch_size}, lengths {cfg.backbone.max_source_length}"
            f"+{cfg.backbone.max_target_length}; {num_tasks(cfg)} tasks, LoRA rank {cfg.lora.rank}",
            f"{'GiB per device':44s}",
            f"  {'frozen backbone (ZeRO-3: / devices)':42s}{gb(p.weights)}",
            f"  {'  of which blocks (FSDP: / devices)':42s}{gb(p.block_weights)}",
            f"  {'LoRA branches of every task':42s}{gb(p.branches)}",
            f"  {'gates':42s}{gb(p.gates)}",
            f"  {'GPM memories (upper bound: full rank)':42s}{gb(p.memories)}",
            f"  {'training state (grads, AdamW; ZeRO: / devices)':42s}{gb(p.training_state(1, False))}",
            f"  {'activations, one step':42s}{gb(p.activations)}",
            f"  {'activations with gradient checkpointing':42s}{gb(p.activations_ckpt)}",
            f"  {'feature collection (float64 covariances)':42s}{gb(p.collection)}",
            f"  {'DeepSpeed gradient bucket (ZeRO-2: two)':42s}{gb(p.bucket)}",
            f"  {'ZeRO-3 weights kept gathered':42s}{gb(p.gathered)}",
            f"  {'ZeRO-3 all-gather buffer (prefetch bucket)':42s}{gb(p.gather_buffer)}",
            f"{'strategy':24s}{'ckpt off':>9s}{'ckpt on':>9s}   fits {card_gb:g} GiB ({USABLE:.0%} usable)"]
    for strategy in STRATEGIES:
        off, on = (p.per_device(strategy, world, c) for c in (False, True))
        limit = card_gb * GIB * USABLE
        fits = "yes" if off <= limit else "with checkpointing" if on <= limit else "no"
        rows.append(f"{strategy:24s}{gb(off)} {gb(on)}   {fits}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    from gainlora.build import world_size
    from gainlora.cli import ArgumentParser, check_overrides, fail, positive_float
    from gainlora.run import CONF_DIR
    from gainlora.schema import ConfigError, validate_config

    parser = ArgumentParser(prog="python -m gainlora.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--card-gb", type=positive_float, default=24.0, help="memory of one device (GiB)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for gainlora.run")
    args = parser.parse_args(argv)
    check_overrides(CONF_DIR, args.overrides)  # a typo'd key or group option: one line, as gainlora.run
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    try:
        validate_config(cfg, machine=False)  # the run's own schema; the planner sizes other machines
    except ConfigError as err:
        fail(str(err))
    devices = cfg.trainer.get("devices", 1)
    world = world_size(cfg.trainer) if devices not in ("auto", -1) else 1
    try:
        print(report(cfg, plan(cfg), world, args.card_gb))
    except PlanError as err:
        fail(str(err))
    except (ValueError, AttributeError, TypeError) as err:
        name = cfg.backbone.get("name_or_path")
        if not name:
            raise
        # a local config.json transformers cannot build a model from, or one without q/v projections
        fail(f"backbone.name_or_path={name}: cannot be sized ({type(err).__name__}: {str(err).splitlines()[0]})")


if __name__ == "__main__":
    main()
