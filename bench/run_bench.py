"""`make bench`: cost of GainLoRA's fused branches, gates and memories, side by side in one run.

Measures, on random-weight backbones (a t5-small-shaped T5 and a tiny LLaMA):
- one training step (forward, backward, AdamW) and greedy generation for: one plain LoRA branch
  (the baseline), GainLoRA with 1, 5 and 15 branches, and an unfused reference that loops over the
  branches in Python as the reference implementation does;
- feature collection and GPM memory update of one task, relative to one training epoch of it
  (the tiny_superni first task on the demo backbone shape, and the t5-small shape);
- peak memory of each configuration, in a fresh subprocess per configuration;
- a whole 15-task run on the tiny T5 with capped SuperNI data (bench/fifteen_tasks.py, in a fresh
  subprocess): task 15 against task 1, the share of the run spent evaluating, peak RSS per task,
  evaluation time against the stored baseline (bench/fifteen_baseline.json).

Timing: time.perf_counter, warm-up calls, then repeats in rotating round-robin order over the
configurations (drifting machine load hits every configuration alike); the median is reported.
Prints a markdown table and writes everything to JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from gainlora.cli import ArgumentParser, fail, positive_int, writable_file
from gainlora.methods.gainlora import GainLoRA
from gainlora.methods.inflora import InfLoRA
from gainlora.model.backbone import Backbone, load_backbone
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.features import Features
from gainlora.model.module import ContinualLM
from gainlora.model.tiny import build_tiny_backbone, with_overrides

RANK, ALPHA, GATE_HIDDEN = 8, 32.0, 100
MiB = 2**20


# -- what is measured ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """A backbone shape and the batch it is benchmarked with."""

    name: str
    kind: str  # "seq2seq" | "causal"
    tokenizer: str  # tiny preset whose tokenizer is used
    config: dict
    batch: int
    source: int
    target: int
    new_tokens: int
    label: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    branches: int
    gated: bool
    unfused: bool = False
    label: str = ""


T5_SMALL = Arch("t5_small", "seq2seq", "t5-test",
                dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                     vocab_size=32128),
                batch=8, source=128, target=16, new_tokens=16,
                label="T5 (t5-small shape: d 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128)")
LLAMA_TINY = Arch("llama_tiny", "causal", "llama-test",
                  dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512),
                  batch=8, source=128, target=16, new_tokens=16,
                  label="LLaMA (tiny: d 512, 4 layers, 8 heads, d_ff 1376, vocab 32000)")
ARCHS = {a.name: a for a in (T5_SMALL, LLAMA_TINY)}

VARIANTS = [
    Variant("lora_1", 1, gated=False, label="LoRA, 1 branch (baseline)"),
    Variant("gainlora_1", 1, gated=True, label="GainLoRA, 1 branch"),
    Variant("gainlora_5", 5, gated=True, label="GainLoRA, 5 branches"),
    Variant("gainlora_15", 15, gated=True, label="GainLoRA, 15 branches"),
    Variant("unfused_5", 5, gated=True, unfused=True, label="unfused loop, 5 branches"),
    Variant("unfused_15", 15, gated=True, unfused=True, label="unfused loop, 15 branches"),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    device: str
    dtype: str  # "float32" | "bf16" (autocast)
    threads: int
    warmup: int
    repeats: int
    quick: bool

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def shrink(arch: Arch) -> Arch:
    """--quick: same layers, a small batch."""
    return Arch(arch.name, arch.kind, arch.tokenizer, arch.config, batch=2, source=32, target=8, new_tokens=4,
                label=arch.label + " [quick batch]")


# -- building models and batches --------------------------------------------------------------------
_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(preset: str):
    if preset not in _TOKENIZERS:
        spec = with_overrides(preset, **TINY_SUPERNI_OVERRIDES) if preset == "t5-demo" else preset
        tok = AutoTokenizer.from_pretrained(build_tiny_backbone(spec))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[preset] = tok
    return _TOKENIZERS[preset]


def make_model(arch: Arch):
    tok = tokenizer_for(arch.tokenizer)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if arch.kind == "seq2seq":
        return T5ForConditionalGeneration(T5Config(**arch.config, decoder_start_token_id=tok.pad_token_id, **ids))
    return LlamaForCausalLM(LlamaConfig(**arch.config, bos_token_id=tok.bos_token_id, **ids))


def unfused_forward(self: GatedLoRALinear, h: Tensor) -> Tensor:
    """The reference implementation's loop: y += a_i(x) * s * (h A_i^T) B_i^T, one branch at a time."""
    y = F.linear(h, self.weight, self.bias)
    coeffs = self.context.coeffs
    if coeffs is not None and coeffs.shape[0] != h.shape[0]:  # generate() expands rows per example
        coeffs = coeffs.repeat_interleave(h.shape[0] // coeffs.shape[0], dim=0)
    for i in range(self.num_branches):
        A, B = self.branch(i)
        delta = F.linear(F.linear(h, A.to(h.dtype)), B.to(h.dtype)) * self.scale
        if coeffs is not None:
            delta = delta * coeffs[:, i].view(-1, *([1] * (h.dim() - 1))).to(delta.dtype)
        y = y + delta
    return y


def build_module(arch: Arch, variant: Variant, device: str, seed: int = 0) -> ContinualLM:
    """Same seed, same weights: a fused variant and its unfused twin hold identical branches."""
    torch.manual_seed(seed)
    model = make_model(arch)
    model.requires_grad_(False)
    backbone = Backbone(model=model, tokenizer=tokenizer_for(arch.tokenizer), kind=arch.kind)
    gates = {"hidden": GATE_HIDDEN, "pool": "mean"} if variant.gated else None
    module = ContinualLM(backbone, rank=RANK, alpha=ALPHA, gates=gates)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(variant.branches):
        module.add_branch()
        if module.gates is not None:
            module.gates.add_gate(copy_previous=True, generator=generator)
    with torch.no_grad():  # trained-looking branches: every branch changes the output
        for layer in module.adapted.values():
            layer.frozen_B.copy_(torch.randn(layer.frozen_B.shape, generator=generator) * 0.02)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.02)
    if variant.unfused:
        for layer in module.adapted.values():
            layer.forward = types.MethodType(unfused_forward, layer)
    return module.to(device)


def random_batches(arch: Arch, count: int, seed: int, device: str) -> tuple[list[dict], dict]:
    """``count`` training batches and one evaluation batch of random tokens.

    Seq2seq sources have random lengths (3/4 to all of ``source``; the longest sets the width),
    right-padded as the collator does; causal rows are full length (nothing to left-pad).
    """
    tok = tokenizer_for(arch.tokenizer)
    g = torch.Generator().manual_seed(seed)
    low, vocab = 4, len(tok)
    B, S, T = arch.batch, arch.source, arch.target

    def seq2seq_source() -> tuple[Tensor, Tensor]:
        lengths = torch.randint(S * 3 // 4, S + 1, (B,), generator=g)
        lengths[0] = S
        mask = (torch.arange(S)[None] < lengths[:, None]).long()
        ids = torch.randint(low, vocab, (B, S), generator=g) * mask + tok.pad_token_id * (1 - mask)
        ids[torch.arange(B), lengths - 1] = tok.eos_token_id
        return ids, mask

    train = []
    for _ in range(count):
        answer = torch.randint(low, vocab, (B, T), generator=g)
        answer[:, -1] = tok.eos_token_id
        if arch.kind == "seq2seq":
            ids, mask = seq2seq_source()
            train.append({"input_ids": ids, "attention_mask": mask, "gate_mask": mask, "labels": answer})
        else:
            source = torch.randint(low, vocab, (B, S), generator=g)
            source[:, 0] = tok.bos_token_id
            ids = torch.cat([source, answer], 1)
            gate_mask = torch.cat([torch.ones(B, S), torch.zeros(B, T)], 1).long()
            labels = torch.cat([torch.full((B, S), -100), answer], 1)
            train.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "gate_mask": gate_mask,
                          "labels": labels})
    if arch.kind == "seq2seq":
        ids, mask = seq2seq_source()
    else:
        ids = torch.randint(low, vocab, (B, S), generator=g)
        ids[:, 0] = tok.bos_token_id
        mask = torch.ones_like(ids)
    evaluation = {"input_ids": ids, "attention_mask": mask, "gate_mask": mask}
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return [move(b) for b in train], move(evaluation)


# -- timing -----------------------------------------------------------------------------------------
def time_round_robin(fns: dict[str, Callable[[], object]], s: Settings, warmup: int | None = None,
                     repeats: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up, then repeats in rotating order."""
    warmup = s.warmup if warmup is None else warmup
    repeats = s.repeats if repeats is None else repeats
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            s.sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            s.sync()
            start = time.perf_counter()
            fns[name]()
            s.sync()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "max_ms": 1e3 * max(seconds), "runs_ms": [round(1e3 * x, 3) for x in seconds]}


def train_step_fn(module: ContinualLM, batch: dict, s: Settings) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)

    def step() -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        with s.autocast:
            loss = module(batch)
        loss.backward()
        optimizer.step()

    return step


def generate_fn(module: ContinualLM, batch: dict, arch: Arch, s: Settings) -> Callable[[], None]:
    def generate() -> None:
        module.eval()
        with s.autocast:
            # min_new_tokens: random weights may emit EOS early; every variant decodes the same length.
            module.generate(batch, max_new_tokens=arch.new_tokens, min_new_tokens=arch.new_tokens, num_beams=1)

    return generate


def fused_matches_unfused(arch: Arch, variant: Variant, s: Settings, batch: dict) -> float:
    """Relative difference of the loss, fused vs unfused (same weights): the loop is a true reference."""
    twin = Variant(variant.name + "_twin", variant.branches, variant.gated, unfused=not variant.unfused)
    losses = []
    for v in (variant, twin):
        module = build_module(arch, v, s.device)
        module.eval()
        with torch.no_grad(), s.autocast:
            losses.append(module(batch).double().item())
        del module
    return abs(losses[0] - losses[1]) / abs(losses[1])


def count_gflop(fn: Callable[[], object]) -> float:
    """Matrix-product and attention FLOPs of one call (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def bench_steps(arch: Arch, s: Settings, variants: list[Variant]) -> dict:
    train_batches, eval_batch = random_batches(arch, 1, seed=0, device=s.device)
    batch = train_batches[0]
    modules = {v.name: build_module(arch, v, s.device) for v in variants}
    steps = {n: train_step_fn(m, batch, s) for n, m in modules.items()}
    generations = {n: generate_fn(m, eval_batch, arch, s) for n, m in modules.items()}
    train = time_round_robin(steps, s)
    generate = time_round_robin(generations, s)
    out = {}
    for v in variants:
        m = modules[v.name]
        out[v.name] = {"label": v.label, "branches": v.branches, "gated": v.gated, "unfused": v.unfused,
                       "trainable_params": sum(p.numel() for p in m.trainable_parameters()),
                       "train": summary(train[v.name]), "generate": summary(generate[v.name]),
                       "train_gflop": count_gflop(steps[v.name]), "generate_gflop": count_gflop(generations[v.name])}
    return out


def bench_layer(arch: Arch, s: Settings) -> dict:
    """One adapted layer alone (d x d, batch x source rows), forward + backward, gated, 1/5/15
    branches fused and unfused, and the frozen base product alone: the LoRA part without the rest
    of the backbone around it."""
    d = arch.config.get("d_model") or arch.config["hidden_size"]
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, bias=False).to(s.device).requires_grad_(False)
    h = torch.randn(arch.batch, arch.source, d, device=s.device, requires_grad=True)
    grad = torch.randn(arch.batch, arch.source, d, device=s.device)

    def base_only() -> None:
        with s.autocast:
            y = base(h)
        y.backward(grad)

    fns: dict[str, Callable[[], None]] = {"base": base_only}
    for n in (1, 5, 15):
        context = BranchContext()
        coeffs = torch.rand(arch.batch, n, device=s.device, requires_grad=True)
        for unfused in (False, True):
            layer = GatedLoRALinear(copy.deepcopy(base), rank=RANK, alpha=ALPHA, context=context, stream="encoder")
            for _ in range(n):
                layer.add_branch()
            with torch.no_grad():
                layer.frozen_B.normal_(0, 0.02)
                layer.lora_B.normal_(0, 0.02)
            if unfused:
                layer.forward = types.MethodType(unfused_forward, layer)

            def call(layer: GatedLoRALinear = layer, context: BranchContext = context, coeffs: Tensor = coeffs) -> None:
                context.coeffs = coeffs  # as every model forward does: per-forward caches start empty
                with s.autocast:
                    y = layer(h)
                y.backward(grad)

            fns[f"{'unfused' if unfused else 'fused'}_{n}"] = call
    times = time_round_robin(fns, s)
    return {"rows": arch.batch * arch.source, "d": d, **{k: summary(v) for k, v in times.items()}}


def profile_step(arch: Arch, variant: Variant, s: Settings, rows: int = 12) -> str:
    """torch.profiler's top operators (self time) of one training step, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    batch = random_batches(arch, 1, seed=0, device=s.device)[0][0]
    module = build_module(arch, variant, s.device)
    step = train_step_fn(module, batch, s)
    for _ in range(max(s.warmup, 1)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        s.sync()
    key = "self_cuda_time_total" if s.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40)


# -- feature collection and memory update ----------------------------------------------------------
@dataclass
class TaskShape:
    """One task as the continual loop sees it: training batches for an epoch, and a next task."""

    name: str
    arch: Arch
    backbone: Callable[[], Backbone]
    batches: list[dict]
    next_batches: list[dict]  # the following task's batches (a memory update on a non-empty memory)
    num_tasks: int
    source_note: str
    examples: int


def bench_backbone(arch: Arch) -> Backbone:
    torch.manual_seed(0)
    model = make_model(arch)
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer_for(arch.tokenizer), kind=arch.kind)


# experiments/tiny_superni.yaml: the t5-demo preset with random weights (pretrain_steps 0), batch 32
# (conf/config.yaml), sources up to 256 tokens, targets up to 32, 128 training examples per task.
TINY_SUPERNI = Arch("t5_demo", "seq2seq", "t5-demo", {}, batch=32, source=256, target=32, new_tokens=32,
                    label="T5 t5-demo preset (d 128, 2+2 layers, 4 heads, d_ff 512), random weights")
TINY_SUPERNI_OVERRIDES = {"pretrain_steps": 0}


def find_data(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("GAINLORA_DATA"), "data/CL_Benchmark"]
    for c in candidates:
        if c and (Path(c) / "SuperNI").is_dir():
            return Path(c)
    return None


def superni_batches(root: Path, task: str, arch: Arch, examples: int) -> list[dict]:
    """The task's first training examples as the data module batches them (no shuffling needed)."""
    from gainlora.data.benchmarks import load_task
    from gainlora.data.collate import Collator

    data = load_task(root, "superni", task, seed=0, max_train=examples)
    collate = Collator(tokenizer_for(arch.tokenizer), arch.kind, max_source_length=arch.source,
                       max_target_length=arch.target)
    return [collate.train_batch(data.train[i:i + arch.batch]) for i in range(0, len(data.train), arch.batch)]


def tiny_superni_task(data_dir: str | None, s: Settings) -> TaskShape:
    arch = TINY_SUPERNI
    examples = 128  # experiments/tiny_superni.yaml: max_train_per_task
    root = find_data(data_dir)
    if root is not None:
        first = superni_batches(root, "task1572_samsum_summary", arch, examples)
        second = superni_batches(root, "task363_sst2_polarity_classification", arch, examples)
        note = f"SuperNI task1572_samsum_summary (then task363_sst2) from {root}"
    else:
        first = random_batches(arch, examples // arch.batch, seed=0, device="cpu")[0]
        second = random_batches(arch, examples // arch.batch, seed=1, device="cpu")[0]
        note = "random tokens of the tiny_superni shapes (no CL_Benchmark found)"
    move = lambda bs: [{k: v.to(s.device) for k, v in b.items()} for b in bs]  # noqa: E731
    backbone = lambda: load_backbone(tiny="t5-demo", tiny_overrides=TINY_SUPERNI_OVERRIDES)  # noqa: E731
    return TaskShape("tiny_superni", arch, backbone, move(first), move(second), num_tasks=3, source_note=note,
                     examples=examples)


def t5_small_task(s: Settings, arch: Arch, quick: bool) -> TaskShape:
    count = 2 if quick else max(128 // arch.batch, 1)  # 128 examples, as tiny_superni
    first = random_batches(arch, count, seed=0, device=s.device)[0]
    second = random_batches(arch, count, seed=1, device=s.device)[0]
    return TaskShape("t5_small", arch, lambda: bench_backbone(arch), first, second, num_tasks=15,
                     source_note="random tokens", examples=count * arch.batch)


def bench_memory_update(task: TaskShape, s: Settings, repeats: int | None = None) -> dict:
    """One GainLoRA-InfLoRA task boundary, by parts, against one epoch of training steps.

    Task end = feature collection (adapted-layer and gate covariances over the task's batches) +
    memory update (GPM thresholded SVDs of every layer memory and the three gate memories).
    Task start = the same collection + InfLoRA's A initialisation and the gate key (top SVD directions).
    """
    arch = task.arch
    method = GainLoRA(InfLoRA(threshold=0.995), hidden=GATE_HIDDEN, pool="mean")
    module = ContinualLM(task.backbone(), rank=RANK, alpha=ALPHA, gates=method.gate_spec).to(s.device)
    method.setup(module, task.num_tasks)
    method.on_task_start(module, 0, lambda: task.batches)  # opens branch and gate, initialises them
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)

    def epoch() -> None:
        module.train()
        for batch in task.batches:
            optimizer.zero_grad(set_to_none=True)
            with s.autocast:
                loss = module(batch)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def forward_pass() -> None:  # what collection costs at least: one forward over the same batches
        module.eval()
        for batch in task.batches:
            with s.autocast:
                module(batch)

    def collect(batches: list[dict]) -> Features:
        with s.autocast:
            return module.collect_features(batches, max_batches=method.max_batches, layers=True, gate=True)

    feats = collect(task.batches)
    layer_spaces = method.branches
    empty = (copy.deepcopy(layer_spaces.memories), copy.deepcopy(method.gate_memory))

    def update(t: int, feats: Features) -> None:
        """InfLoRA layer memories + gate memories: GainLoRA's task-end step after collection."""
        method.update_memories(module, t, feats)

    def restore(state: tuple) -> None:
        layer_spaces.memories, method.gate_memory = copy.deepcopy(state[0]), copy.deepcopy(state[1])

    # State after task 1's update, for timing task 2's (the residual-SVD path on a non-empty memory).
    restore(empty)
    update(0, feats)
    after_first = (copy.deepcopy(layer_spaces.memories), copy.deepcopy(method.gate_memory))
    next_feats = collect(task.next_batches)

    def update_first() -> None:
        restore(empty)
        update(0, feats)

    def update_second() -> None:
        restore(after_first)
        update(1, next_feats)

    def init_start() -> None:  # InfLoRA A init (residual SVD per layer input) + gate key init
        method.init_branch(module, 0, feats)

    restore(empty)  # copies are part of neither update: time them alone and subtract
    fns = {"epoch": epoch, "forward_pass": forward_pass, "collect": lambda: collect(task.batches),
           "update_task1": update_first, "update_task2": update_second,
           "copy_memories_task1": lambda: restore(empty), "copy_memories_task2": lambda: restore(after_first),
           "init_task_start": init_start}
    times = time_round_robin(fns, s, warmup=1, repeats=repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["update_task1"] = max(med["update_task1"] - med.pop("copy_memories_task1"), 0.0)
    med["update_task2"] = max(med["update_task2"] - med.pop("copy_memories_task2"), 0.0)
    ranks = {"layers": sorted({sp.rank for sp in layer_spaces.memories.values()}),
             "gate": [m.rank for m in method.gate_memory]}
    epoch_s = med["epoch"]
    return {
        "task": task.name, "data": task.source_note, "arch": arch.label, "examples": task.examples,
        "batches": len(task.batches), "batch": arch.batch, "layer_covariances": len(feats.layers),
        "distinct_layer_inputs": len({id(c) for c in feats.layers.values()}),
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "runs_ms": {k: [round(1e3 * x, 3) for x in v] for k, v in times.items()},
        "relative_to_epoch": {k: v / epoch_s for k, v in med.items() if k != "epoch"},
        "task_end_relative": (med["collect"] + med["update_task1"]) / epoch_s,
        "memory_ranks_after_task2": ranks,
    }


# -- peak memory (fresh subprocess per configuration) ------------------------------------------------
def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe_memory(arch: Arch, variant: Variant, s: Settings) -> dict:
    """Runs in its own process: resident size after building, and the peak above it of a train step
    and of a generate call (each after one warm-up call, so optimizer state is already resident)."""
    batches, eval_batch = random_batches(arch, 1, seed=0, device=s.device)
    module = build_module(arch, variant, s.device)
    step, generate = train_step_fn(module, batches[0], s), generate_fn(module, eval_batch, arch, s)
    out: dict = {}
    if s.device == "cuda":
        out["resident_mib"] = torch.cuda.memory_allocated() / MiB
        for name, fn in (("train", step), ("generate", generate)):
            fn()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            out[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
        out["method"] = "torch.cuda.max_memory_allocated above memory_allocated"
        return out
    out["resident_mib"] = _status_kib("VmRSS") / 1024
    exact = True
    for name, fn in (("train", step), ("generate", generate)):
        fn()
        exact &= _reset_peak_rss()
        base = _status_kib("VmRSS")
        fn()
        out[f"{name}_peak_mib"] = (_status_kib("VmHWM") - base) / 1024
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["method"] = ("VmHWM above VmRSS (peak reset through /proc/self/clear_refs), malloc mmap threshold "
                     "64 KiB so freed buffers leave the RSS" if exact else "ru_maxrss only (no clear_refs)")
    return out


def run_probe(arch: Arch, variant: Variant, s: Settings, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--probe", f"{arch.name}:{variant.name}", "--device", s.device,
           "--dtype", s.dtype, "--threads", str(s.threads)] + (["--quick"] if quick else [])
    # A fixed mmap threshold (no dynamic raise) returns large freed blocks to the OS at once, so RSS
    # follows live tensors and the peak of one step is visible.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------------
def ratios_and_targets(steps: dict, updates: dict) -> tuple[dict, list[dict]]:
    ratios: dict = {}
    for arch_name, rows in steps.items():
        base = rows.get("lora_1")
        if base is None:
            continue
        ratios[arch_name] = {
            v: {"train_vs_lora": r["train"]["median_ms"] / base["train"]["median_ms"],
                "generate_vs_lora": r["generate"]["median_ms"] / base["generate"]["median_ms"],
                "train_flop_vs_lora": r["train_gflop"] / base["train_gflop"],
                "generate_flop_vs_lora": r["generate_gflop"] / base["generate_gflop"]}
            for v, r in rows.items()}
        for n in (5, 15):
            fused, loop = rows.get(f"gainlora_{n}"), rows.get(f"unfused_{n}")
            if fused and loop:
                ratios[arch_name][f"unfused_{n}"]["train_speedup_fused"] = (
                    loop["train"]["median_ms"] / fused["train"]["median_ms"])
                ratios[arch_name][f"unfused_{n}"]["generate_speedup_fused"] = (
                    loop["generate"]["median_ms"] / fused["generate"]["median_ms"])
    targets = []
    for arch_name, r in ratios.items():
        if "gainlora_15" in r:
            targets.append({"what": f"{arch_name}: GainLoRA-15 train step / LoRA-1", "value": r["gainlora_15"]
                            ["train_vs_lora"], "target": "<= 1.10", "met": r["gainlora_15"]["train_vs_lora"] <= 1.10})
            targets.append({"what": f"{arch_name}: GainLoRA-15 generation / LoRA-1",
                            "value": r["gainlora_15"]["generate_vs_lora"], "target": "<= 1.10",
                            "met": r["gainlora_15"]["generate_vs_lora"] <= 1.10})
        if "unfused_15" in r and "train_speedup_fused" in r["unfused_15"]:
            value = r["unfused_15"]["train_speedup_fused"]
            targets.append({"what": f"{arch_name}: unfused-15 / fused-15 train step", "value": value,
                            "target": ">= 1.5", "met": value >= 1.5})
    if "tiny_superni" in updates:
        u = updates["tiny_superni"]
        value = u["relative_to_epoch"]["update_task1"]
        targets.append({"what": "tiny_superni task 1: memory update / epoch", "value": value, "target": "<= 0.10",
                        "met": value <= 0.10})
        targets.append({"what": "tiny_superni task 1: collection + memory update / epoch",
                        "value": u["task_end_relative"], "target": "(reported)", "met": None})
    return ratios, targets


def markdown(result: dict) -> str:
    lines = []
    for arch_name, rows in result["steps"].items():
        r = result["ratios"].get(arch_name, {})
        mem = result.get("peak_memory", {}).get(arch_name, {})
        lines += [f"### {ARCHS[arch_name].label}", "",
                  f"batch {result['shapes'][arch_name]['batch']}, source {result['shapes'][arch_name]['source']}, "
                  f"target {result['shapes'][arch_name]['target']}, {result['shapes'][arch_name]['new_tokens']} "
                  "new tokens (greedy)", "",
                  "| configuration | train step ms | x LoRA | (FLOPs x) | generate ms | x LoRA | (FLOPs x) | "
                  "train peak MiB | generate peak MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            m = mem.get(name, {})
            peak = lambda k: f"{m[k]:.0f}" if k in m else "-"  # noqa: E731
            rr = r.get(name, {})
            lines.append(f"| {row['label']} | {row['train']['median_ms']:.1f} | {rr.get('train_vs_lora', math.nan):.3f} | "
                         f"({rr.get('train_flop_vs_lora', math.nan):.3f}) | {row['generate']['median_ms']:.1f} | "
                         f"{rr.get('generate_vs_lora', math.nan):.3f} | ({rr.get('generate_flop_vs_lora', math.nan):.3f}) | "
                         f"{peak('train_peak_mib')} | {peak('generate_peak_mib')} |")
        for n in (5, 15):
            if "train_speedup_fused" in r.get(f"unfused_{n}", {}):
                u = r[f"unfused_{n}"]
                lines.append("")
                lines.append(f"Fused vs unfused loop at {n} branches: train step {u['train_speedup_fused']:.2f}x faster, "
                             f"generation {u['generate_speedup_fused']:.2f}x faster.")
        lines.append("")
    if result.get("layer"):
        lines += ["### One adapted layer alone (forward + backward, gated)", "",
                  "| backbone | rows x d | base product | fused 1 | unfused 1 | fused 5 | unfused 5 | fused 15 | "
                  "unfused 15 | unfused / fused at 15 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arch_name, r in result["layer"].items():
            ms = lambda k: r[k]["median_ms"]  # noqa: E731
            cells = " | ".join(f"{ms(k):.2f}" for k in ("base", "fused_1", "unfused_1", "fused_5", "unfused_5",
                                                        "fused_15", "unfused_15"))
            lines.append(f"| {arch_name} | {r['rows']} x {r['d']} | {cells} | {ms('unfused_15') / ms('fused_15'):.2f} |")
        lines += ["", "Milliseconds (medians); the base product is the frozen d x d projection alone."]
        lines.append("")
    if result.get("memory_update"):
        lines += ["### Feature collection and memory update (GainLoRA-InfLoRA, one task)", "",
                  "| task | batches | epoch ms | forward pass | collection | update (task 1) | update (task 2) | "
                  "task-start init | task end (collect + update 1) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for u in result["memory_update"].values():
            ms, rel = u["median_ms"], u["relative_to_epoch"]
            cell = lambda k: f"{ms[k]:.1f} ms ({100 * rel[k]:.1f}%)"  # noqa: E731
            lines.append(f"| {u['task']} ({u['examples']} ex.) | {u['batches']} x {u['batch']} | {ms['epoch']:.1f} | "
                         f"{cell('forward_pass')} | {cell('collect')} | {cell('update_task1')} | "
                         f"{cell('update_task2')} | {cell('init_task_start')} | {100 * u['task_end_relative']:.1f}% |")
        lines += ["", "Percentages are of one training epoch over the same batches."]
        lines.append("")
    if result.get("fifteen"):
        lines += [result["fifteen"].get("markdown") or result["fifteen"]["skipped"], ""]
    if result.get("targets"):
        lines += ["### Targets", "", "| target | value | goal | met |", "|---|---:|---:|:---:|"]
        for t in result["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['what']} | {t['value']:.3f} | {t['target']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def bench_fifteen(data_dir: str | None, out: Path) -> dict:
    """bench/fifteen_tasks.py in a fresh process (its own peak RSS), one thread, against the stored
    baseline; skipped without the SuperNI data."""
    root = find_data(data_dir)
    if root is None:
        return {"skipped": "15 tasks: skipped, no CL_Benchmark found (GAINLORA_DATA or `make data`)"}
    here = Path(__file__).resolve().parent
    path = out.with_name(out.stem + "_fifteen.json")
    done = subprocess.run([sys.executable, str(here / "fifteen_tasks.py"), "--out", str(path), "--baseline",
                           str(here / "fifteen_baseline.json"), f"benchmark.data_dir={root}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:  # the run's own log only when it failed: 15 tasks of it otherwise
        raise SystemExit(f"15-task run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(path.read_text())


# -- entry point --------------------------------------------------------------------------------------
def machine_info(s: Settings) -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": s.device, "dtype": s.dtype,
            "warmup": s.warmup, "repeats": s.repeats, "quick": s.quick,
            "started": dt.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    if s.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save(result: dict, load_log: dict, t0: float, out: Path) -> None:
    """Derive ratios, targets and the markdown table from what is measured so far; write the JSON."""
    result["ratios"], result["targets"] = ratios_and_targets(result["steps"], result["memory_update"])
    result["meta"]["loadavg_by_section"] = load_log
    result["meta"]["elapsed_s"] = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        result["meta"]["loadavg_end"] = os.getloadavg()
    result["markdown"] = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def names(known: list[str]) -> Callable[[str], str]:
    """An argparse type: a comma list of ``known`` names (an unknown one was a KeyError mid-bench)."""
    def check(text: str) -> str:
        bad = next((n for n in text.split(",") if n not in known), None)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"{text}: a comma list of {', '.join(known)} ({bad or 'an empty name'} "
                                             "is not one)")
        return text
    return check


def non_negative_int(text: str) -> int:
    if not text.strip().lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"{text}: an integer >= 0")
    return int(text)


SECTIONS = ["steps", "layer", "update", "memory", "profile", "fifteen"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # one error line, exit 2 (0 repeats or threads were tracebacks after the models were built)
    p = ArgumentParser(prog="bench/run_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16: torch.autocast")
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="smoke run: small batches, 1 warm-up, 2 repeats")
    p.add_argument("--warmup", type=non_negative_int, default=None)
    p.add_argument("--repeats", type=positive_int, default=None)
    p.add_argument("--archs", type=names(list(ARCHS)), default="t5_small,llama_tiny")
    p.add_argument("--variants", type=names(list(VARIANT_BY_NAME)),
                   default="lora_1,gainlora_1,gainlora_5,gainlora_15,unfused_15",
                   help=f"comma list of {', '.join(VARIANT_BY_NAME)}")
    p.add_argument("--sections", type=names(SECTIONS), default=",".join(SECTIONS),
                   help="comma list of steps, layer, update, memory (peak, subprocesses), profile, fifteen "
                        "(a 15-task run)")
    p.add_argument("--data-dir", default=None, help="CL_Benchmark folder for the tiny_superni task")
    p.add_argument("--out", default="bench/results/bench.json")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: arch:variant memory probe
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda: cpu here (this machine has no CUDA device)")
    unwritable = writable_file(Path(args.out))
    if unwritable:  # it was found out only when the first section's results were saved
        fail(f"--out={args.out}: {unwritable}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(args.device, args.dtype, args.threads,
                 warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
                 repeats=args.repeats if args.repeats is not None else (2 if args.quick else 5), quick=args.quick)
    archs = [ARCHS[a] for a in args.archs.split(",") if a]
    archs = [shrink(a) for a in archs] if args.quick else archs
    if args.probe:
        arch_name, variant_name = args.probe.split(":")
        arch = shrink(ARCHS[arch_name]) if args.quick else ARCHS[arch_name]
        print(json.dumps(probe_memory(arch, VARIANT_BY_NAME[variant_name], s)))
        return 0

    variants = [VARIANT_BY_NAME[v] for v in args.variants.split(",") if v]
    sections = set(args.sections.split(","))
    result: dict = {"meta": machine_info(s), "command": " ".join([Path(sys.executable).name] + sys.argv),
                    "shapes": {a.name: asdict(a) for a in archs}, "steps": {}, "memory_update": {},
                    "peak_memory": {}, "checks": {}, "profiles": {}, "layer": {}}
    t0 = time.perf_counter()
    load_log: dict[str, tuple[float, float, float]] = {}

    def log_load(section: str) -> None:  # other jobs on the machine make timings noisy: keep a record
        with contextlib.suppress(OSError):
            load_log[section] = os.getloadavg()

    if "steps" in sections:
        for arch in archs:
            print(f"[bench] steps: {arch.name}", file=sys.stderr, flush=True)
            result["steps"][arch.name] = bench_steps(arch, s, variants)
            if any(v.unfused for v in variants):
                batch = random_batches(arch, 1, seed=0, device=s.device)[0][0]
                result["checks"][f"{arch.name}_fused_vs_unfused_15_rel_loss_diff"] = fused_matches_unfused(
                    arch, VARIANT_BY_NAME["gainlora_15"], s, batch)
            log_load(f"steps:{arch.name}")
            save(result, load_log, t0, Path(args.out))  # partial results survive an interrupted run
    if "layer" in sections:
        for arch in archs:
            print(f"[bench] one adapted layer: {arch.name}", file=sys.stderr, flush=True)
            result["layer"][arch.name] = bench_layer(arch, s)
        log_load("layer")
        save(result, load_log, t0, Path(args.out))
    if "update" in sections:
        print("[bench] feature collection + memory update", file=sys.stderr, flush=True)
        tiny = tiny_superni_task(args.data_dir, s)
        if args.quick:  # two small batches are enough to exercise the path
            tiny.batches, tiny.next_batches = tiny.batches[:1], tiny.next_batches[:1]
        result["memory_update"]["tiny_superni"] = bench_memory_update(tiny, s)
        if any(a.name == "t5_small" for a in archs):
            t5 = next(a for a in archs if a.name == "t5_small")
            # Epochs of 16 full-size steps: a few repeats are enough and keep `make bench` short.
            result["memory_update"]["t5_small"] = bench_memory_update(t5_small_task(s, t5, args.quick), s,
                                                                      repeats=min(s.repeats, 3))
        log_load("update")
        save(result, load_log, t0, Path(args.out))
    if "profile" in sections:
        for arch in archs[:1]:
            for name in ("lora_1", "gainlora_15", "unfused_15"):
                if name in VARIANT_BY_NAME:
                    print(f"[bench] profile: {arch.name} {name}", file=sys.stderr, flush=True)
                    result["profiles"][f"{arch.name}:{name}"] = profile_step(arch, VARIANT_BY_NAME[name], s)
        log_load("profile")
        save(result, load_log, t0, Path(args.out))
    if "memory" in sections:
        probe_variants = [VARIANT_BY_NAME["lora_1"], VARIANT_BY_NAME["gainlora_15"]] if args.quick else variants
        for arch in archs:
            print(f"[bench] peak memory: {arch.name}", file=sys.stderr, flush=True)
            result["peak_memory"][arch.name] = {v.name: run_probe(arch, v, s, args.quick) for v in probe_variants}
        log_load("memory")
        save(result, load_log, t0, Path(args.out))
    if "fifteen" in sections:
        print("[bench] 15 tasks", file=sys.stderr, flush=True)
        result["fifteen"] = bench_fifteen(args.data_dir, Path(args.out))
        log_load("fifteen")
    save(result, load_log, t0, Path(args.out))
    print(result["markdown"])
    print(f"[bench] wrote {args.out} in {result['meta']['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
