"""The run configuration's schema: every user-facing key typed and ranged, checked before anything is
built or written.

Validation runs on the resolved config as JSON data in pydantic's strict mode, so a value is what
the user typed (an int may stand for a float; "3" is not a number, 4.0 is not an int, 1 is not a
bool, NaN and inf are refused). Unknown keys are refused, so a typo fails instead of being ignored.
Objects named by ``_target_`` are checked by ``gainlora.targets`` (allow-lists, arguments bound to
the constructor's signature).

A bad value raises ``ConfigError("<dotted.key>=<value>: <what is accepted>")``.
"""
from __future__ import annotations

import inspect
import os
from importlib.util import find_spec
import json
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                   TorchElasticEnvironment)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gainlora import fsdp
from gainlora.data.tasks import READERS
from gainlora.model.tiny_models import ARCHS
from gainlora.targets import (STRICT, ConfigError, bind_logger, bind_optimizer, bind_strategy, check_method,
                              check_name, from_pydantic, refuse)

__all__ = ["ConfigError", "RunConfig", "check_name", "validate_config"]


# -- the sections ----------------------------------------------------------------------------------------
PosInt = Annotated[int, Field(gt=0)]
MAX_TOKENS = 131072  # past any model's context: a run only hangs or dies allocating
Length = Annotated[int, Field(gt=0, le=MAX_TOKENS)]  # tokens
NonNegInt = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    model_config = STRICT


class Lora(Section):
    rank: PosInt
    alpha: Annotated[float, Field(gt=0)]
    dropout: Annotated[float, Field(ge=0, lt=1)]


class Data(Section):
    batch_size: PosInt
    global_batch_size: PosInt | None
    eval_batch_size: PosInt
    num_workers: NonNegInt


class Generation(Section):
    num_beams: Annotated[int, Field(gt=0, le=64)]  # each beam multiplies generation's memory: 10^5 beams OOM-kill


class Checkpoint(Section):
    every_n_epochs: NonNegInt | None
    every_n_train_steps: NonNegInt | None


class Metrics(Section):
    single_task_run: Annotated[str, Field(min_length=1)] | None


class Paths(Section):
    runs_dir: Annotated[str, Field(min_length=1)]
    data_dir: str | None
    cache_dir: str | None
    run_dir: str | None


class TinyOverrides(Section):
    """Fields of ``gainlora.model.tiny.TinySpec`` a config may change (each optional)."""
    arch: Literal[ARCHS] | None = None  # type: ignore[valid-type]
    d_model: PosInt | None = None
    layers: PosInt | None = None
    heads: PosInt | None = None
    d_ff: PosInt | None = None
    decoder_layers: PosInt | None = None
    vocab_size: Annotated[int, Field(ge=300)] | None = None  # BPE: 256 bytes, the specials, some merges
    max_positions: Length | None = None
    pretrain_steps: NonNegInt | None = None
    pretrain_lr: Annotated[float, Field(gt=0)] | None = None
    pretrain_batch: PosInt | None = None
    pretrain_warmup: NonNegInt | None = None
    pretrain_words: Annotated[int, Field(gt=0, le=10**6)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")] | None = None  # the cache folder's prefix


class Backbone(Section):
    family: str | None = None  # the tiny preset <family>-test stands in for it under debug=cpu_tiny
    name_or_path: Annotated[str, Field(min_length=1)] | None
    tiny: str | None
    tiny_overrides: TinyOverrides | None = None
    dtype: Literal["float32", "bfloat16", "float16"]
    max_source_length: Length
    max_target_length: Length
    max_new_tokens: Length
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    gradient_checkpointing: bool = False
    text_corpus: dict[str, Any] | None = None  # tiny presets: pre-train on this benchmark text (model.pretrain)
    chat_template: bool = False  # render each prompt as one user turn of the tokenizer's chat template

    @model_validator(mode="after")
    def one_source(self) -> Backbone:
        from gainlora.model.tiny import PRESETS

        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("backbone.name_or_path: set exactly one of backbone.name_or_path (a Hugging Face "
                             "name or a local directory) and backbone.tiny (a local preset)")
        if self.family is not None and f"{self.family}-test" not in PRESETS:
            families = sorted(p[: -len("-test")] for p in PRESETS if p.endswith("-test"))
            raise ValueError(f"backbone.family: one of {', '.join(families)}")
        if self.attn_implementation == "flash_attention_2" and (self.family == "t5" or not find_spec("flash_attn")):
            raise ValueError("backbone.attn_implementation: sdpa or eager; flash_attention_2 needs the flash-attn "
                             "package (CUDA) and a decoder-only backbone (T5's position bias has no flash kernel)")
        if self.text_corpus is not None:  # a preset pre-trained on benchmark text (gainlora.model.pretrain)
            from gainlora.model.pretrain import TEXT_PRESETS

            if self.tiny not in TEXT_PRESETS:
                raise ValueError(f"backbone.tiny: with backbone.text_corpus one of {', '.join(TEXT_PRESETS)}")
        elif self.tiny is not None and self.tiny not in PRESETS:
            raise ValueError(f"backbone.tiny: one of {', '.join(PRESETS)}")
        if self.tiny_overrides is not None and self.tiny in PRESETS:
            check_tiny(replace(PRESETS[self.tiny], **self.tiny_overrides.model_dump(exclude_none=True)),
                       self.tiny_overrides.model_dump(exclude_none=True))
        return self


TINY_PARAMETERS = 10**9  # a tiny preset is built and run in float32 on a CPU; past this it exhausts the memory


def check_tiny(spec, overridden: dict) -> None:
    """A tiny preset with overrides: heads divide d_model, positions are Llama's own, and the model
    stays tiny (10^5 layers or d_model=10^6 fill the machine's memory before any check of the run)."""
    key = "backbone.tiny_overrides"
    if spec.d_model % spec.heads:
        if "d_model" in overridden:
            raise ValueError(f"{key}.d_model: a multiple of heads ({spec.heads})")
        raise ValueError(f"{key}.heads: a divisor of d_model ({spec.d_model})")
    if "max_positions" in overridden and spec.arch == "t5":
        raise ValueError(f"{key}.max_positions: leave it unset for a T5 preset (relative positions; decoder-only only)")
    blocks = spec.layers + (spec.decoder_layers or spec.layers if spec.arch == "t5" else 0)
    size = spec.vocab_size * spec.d_model + blocks * (4 * spec.d_model ** 2 + 3 * spec.d_model * spec.d_ff)
    if size > TINY_PARAMETERS:
        largest = max((k for k in ("d_model", "layers", "decoder_layers", "d_ff", "vocab_size") if k in overridden),
                      key=lambda k: overridden[k], default="d_model")
        raise ValueError(f"{key}.{largest}: a tiny preset of at most 10^9 parameters (these overrides make about "
                         f"{size:.1e}); use backbone.name_or_path for a large model")


DEMO_MAX = 10**6  # examples per split of a generated demo task


class Benchmark(Section):
    name: str
    reader: Literal[READERS]  # type: ignore[valid-type]
    data_dir: str | None = None
    order: int | str | None = None
    orders: dict[str, list[str]] | None = None
    # names; the custom reader also takes mappings {name, train, test, val?, metric?, instruction?}
    tasks: Annotated[list[str | dict[str, Any]], Field(min_length=1)] | None = None
    metric: Literal["rougeL", "exact_match"] | None = None  # custom reader: the default per-task metric
    prompt: Literal["superni", "long"] | None = None  # custom reader: the prompt template
    num_tasks: PosInt | None = None
    # demo reader; each example is generated and held in memory: 10^9 of them exhausted it
    n_train: Annotated[int, Field(gt=0, le=DEMO_MAX)] | None = None
    n_val: Annotated[int, Field(ge=0, le=DEMO_MAX)] | None = None
    n_test: Annotated[int, Field(gt=0, le=DEMO_MAX)] | None = None
    max_train_per_task: PosInt | None = None
    max_eval_per_task: PosInt | None = None
    val_size: Annotated[float, Field(gt=0, lt=1)] | None = None  # share of train carved for validation
    selection: Literal["carved", "paper"] = "carved"
    # superni / long readers: task -> the one file its train, val and test are carved from (benchmarks.load_task)
    carve: dict[str, Literal["train", "test"]] | None = None
    carve_test_size: Annotated[float, Field(gt=0, lt=1)] | None = None  # that file's share kept for test

    def available(self) -> list[str]:
        if self.tasks is not None:
            return self.tasks
        if self.reader == "custom":  # it has no orders: its tasks are the user's files
            raise ValueError("benchmark.tasks: list your tasks, e.g. benchmark.tasks=[path/to/task_a,path/to/task_b] "
                             "(folders with train and test .jsonl/.csv files; see examples/custom_tasks)")
        for key, tasks in (self.orders or {}).items():
            if key == str(self.order):
                return tasks
        known = ", ".join(self.orders or {}) or "none"
        raise ValueError(f"benchmark.order: one of {known} (the orders of benchmark {self.name})")

    @model_validator(mode="after")
    def consistent(self) -> Benchmark:
        available = self.available()
        if self.num_tasks is not None and self.num_tasks > len(available):
            names = [t if isinstance(t, str) else t.get("name", "?") for t in available]
            raise ValueError(f"benchmark.num_tasks: 1 to {len(available)} (the stream has {', '.join(names)}), "
                             "or null for all")
        if self.reader == "demo":  # the generated tasks; the file readers name a missing task with its path
            from gainlora.data.demo import DEMO_TASKS

            unknown = [t for t in available if t not in DEMO_TASKS]
            if unknown:
                raise ValueError(f"benchmark.{'tasks' if self.tasks else 'order'}: demo tasks only ({unknown[0]} is "
                                 f"not one; they are {', '.join(DEMO_TASKS)})")
        twice = [t for t in available if available.count(t) > 1]
        if twice:
            raise ValueError(f"benchmark.{'tasks' if self.tasks else 'order'}: each task at most once "
                             f"({twice[0]} appears twice)")
        for task in self.carve or {}:
            if self.reader not in ("superni", "long") or task not in available or self.selection != "carved":
                raise ValueError(f"benchmark.carve.{task}: a task of the stream ({', '.join(available)}) of the "
                                 "superni or long reader, with benchmark.selection=carved")
        for key in sorted(set().union(*READ_BY.values()) - READ_BY[self.reader]):  # set, it would be ignored
            if getattr(self, key) is not None:
                raise ValueError(f"benchmark.{key}: the {self.reader} reader does not read it; leave it unset")
        if self.selection == "paper" and self.reader not in ("superni", "long"):
            raise ValueError(f"benchmark.selection: carved (the {self.reader} reader has no dev split to select on)")
        return self


# The optional benchmark keys each reader reads; one of the others, set, is refused rather than ignored.
READ_BY = {"demo": {"n_train", "n_val", "n_test", "order", "orders"}, "custom": {"metric", "prompt", "val_size"},
           **dict.fromkeys(("superni", "long"),
                           {"data_dir", "val_size", "carve", "carve_test_size", "order", "orders"})}


PRECISIONS = Literal["32-true", "32", 32, "64-true", "64", 64, "16-mixed", "16-true", "16", 16,
                     "bf16-mixed", "bf16-true", "bf16"]


class Trainer(Section):
    """The keys conf/trainer sets; any other ``lightning.Trainer`` argument is allowed, by name."""
    model_config = ConfigDict(STRICT, extra="allow")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
    devices: PosInt | Literal[-1, "auto"] | Annotated[list[NonNegInt], Field(min_length=1)]
    num_nodes: PosInt = 1
    precision: PRECISIONS
    max_epochs: Annotated[int, Field(ge=-1)] | None
    max_steps: Annotated[int, Field(ge=-1)]
    gradient_clip_val: Annotated[float, Field(ge=0)] | None = None
    accumulate_grad_batches: PosInt = 1
    log_every_n_steps: PosInt = 50
    check_val_every_n_epoch: PosInt | None = 1
    limit_val_batches: NonNegInt | Annotated[float, Field(ge=0, le=1)] = 0
    # batches, a fraction of an epoch, or a time ("DD:HH:MM:SS" or a dict); 0 was a ZeroDivisionError at the fit
    val_check_interval: PosInt | Annotated[float, Field(gt=0, le=1)] | str | dict[str, int] | None = None
    num_sanity_val_steps: Annotated[int, Field(ge=-1)] = 0
    enable_checkpointing: bool = False
    enable_model_summary: bool = False
    enable_progress_bar: bool = True
    deterministic: bool | Literal["warn"] = False

    @model_validator(mode="after")
    def trains(self) -> Trainer:
        import lightning as L

        extra = set(self.model_extra or {})
        unknown = sorted(extra - set(inspect.signature(L.Trainer).parameters)
                         | extra & {"strategy", "logger", "callbacks", "default_root_dir"})
        if unknown:  # the run sets the last four itself (strategy: and logger: sections)
            raise ValueError(f"trainer.{unknown[0]}: not a lightning.Trainer argument this config may set")
        partial = sorted(extra & {"fast_dev_run", "limit_test_batches"})
        if partial:  # the accuracy matrix needs a score for every test example (NaN cells ended the run)
            raise ValueError(f"trainer.{partial[0]}: leave it unset (every test example is scored); for a quick run "
                             "use debug=cpu_tiny or benchmark.max_eval_per_task")
        limits = {"max_steps": self.max_steps, "max_epochs": self.max_epochs,
                  "limit_train_batches": (self.model_extra or {}).get("limit_train_batches")}
        zero = [key for key, value in limits.items() if value == 0]
        if zero:
            none = "" if zero[0] == "limit_train_batches" else ", or -1 for none"
            raise ValueError(f"trainer.{zero[0]}: a positive limit{none} (0 trains nothing)")
        if self.max_steps == -1 and (self.max_epochs is None or self.max_epochs < 0):
            raise ValueError("trainer.max_steps: a positive limit when trainer.max_epochs is unlimited "
                             "(both unlimited would train forever)")
        return self


class Derived(Section):
    """What the run writes itself (``build.derive_batching``, ``rundir.record_inputs``); a resume reads
    it back from config.yaml, so a tampered one is refused here rather than failing inside the check."""
    model_config = ConfigDict(STRICT, extra="allow")
    data_sha256: dict[str, str] | None = None
    code_version: str | None = None


class RunConfig(Section):
    exp_name: Any  # checked by check_name
    seed: Annotated[int, Field(ge=0, lt=2**31)]
    run_id: Any  # checked by check_name
    resume: bool
    lora: Lora
    optimizer: dict[str, Any]
    data: Data
    generation: Generation
    checkpoint: Checkpoint
    metrics: Metrics
    paths: Paths
    backbone: Backbone
    benchmark: Benchmark
    method: dict[str, Any]
    trainer: Trainer
    strategy: dict[str, Any]
    logger: dict[str, dict[str, Any] | None] | None
    derived: Derived | None = None

    @model_validator(mode="after")
    def validates_on_data(self) -> RunConfig:
        if self.benchmark.n_val == 0 and self.trainer.limit_val_batches:  # the fit read an empty split: a traceback
            raise ValueError("benchmark.n_val: at least 1 while trainer.limit_val_batches is set (validation reads "
                             "the val split), or set trainer.limit_val_batches=0")
        return self


# -- the whole config -------------------------------------------------------------------------------------
def validate_config(cfg: DictConfig, *, machine: bool = True) -> RunConfig:
    """Check every key of a resolved run config; ``machine``: also that this machine can run it
    (accelerator present), which loading a run for inference does not need."""
    probe = cfg.copy()
    if OmegaConf.select(probe, "paths.run_dir") is None and "paths" in probe:
        probe.paths.run_dir = "<run_dir>"  # loggers' save_dir interpolates it; set once the run dir is known
    try:
        data = OmegaConf.to_container(probe, resolve=True)
    except Exception as err:  # an interpolation that cannot resolve (e.g. an unset environment variable)
        raise ConfigError(f"config: {err}".splitlines()[0]) from None
    try:
        valid = RunConfig.model_validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise from_pydantic(err, data, model=RunConfig) from None
    check_name("exp_name", valid.exp_name)
    if valid.run_id is not None:
        check_name("run_id", valid.run_id)
    check_method("method", data["method"])
    bind_optimizer(data["optimizer"])
    bind_strategy(data["strategy"])
    fsdp.check(data["strategy"], data["trainer"])
    for name, spec in (data["logger"] or {}).items():
        if spec is not None:
            bind_logger(name, spec)
    if machine:
        check_machine(valid, data["strategy"])
    return valid


CLUSTERS = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment)  # those Lightning detects


def check_machine(cfg: RunConfig, strategy: dict) -> None:
    trainer = cfg.trainer
    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise refuse("trainer.accelerator", trainer.accelerator, "cpu or auto: this machine has no CUDA GPU")
    if trainer.accelerator == "mps" and not torch.backends.mps.is_available():
        raise refuse("trainer.accelerator", "mps", "cpu or auto: this machine has no MPS device")
    if trainer.accelerator == "tpu":
        raise refuse("trainer.accelerator", "tpu", "auto, cpu or gpu (this project does not run on TPUs)")
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and str(trainer.precision).startswith("16"):
        raise refuse("trainer.precision", trainer.precision, "32-true, 64-true or bf16-* on a CPU (fp16 needs a GPU)")
    cores = os.cpu_count() or 1
    if isinstance(trainer.devices, int) and trainer.devices > 1 and not on_cpu \
            and trainer.devices > torch.cuda.device_count():
        raise refuse("trainer.devices", trainer.devices, f"at most {torch.cuda.device_count()} (the GPUs here)")
    if on_cpu and isinstance(trainer.devices, int) and trainer.devices > cores:  # each one a process: 100 froze it
        raise refuse("trainer.devices", trainer.devices, f"at most {cores} on a CPU run (one process per device; "
                     f"this machine has {cores} cores)")
    if trainer.num_nodes > 1 and not any(env.detect() for env in CLUSTERS) and "NODE_RANK" not in os.environ:
        # Lightning's default environment waits for the other nodes, 30 minutes, then times out
        raise refuse("trainer.num_nodes", trainer.num_nodes, "1 here: several nodes need a launcher (SLURM, torchrun, "
                     "MPI, LSF) or MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node")
    if cfg.data.num_workers > 4 * cores:  # each worker is a process: 10^5 of them hang the machine
        raise refuse("data.num_workers", cfg.data.num_workers, f"at most {4 * cores} (4 per CPU core here)")
    target, name = str(strategy.get("_target_", "")), str(strategy.get("name", ""))
    if "DeepSpeed" in target or name.startswith("deepspeed"):
        if on_cpu and (target == "lightning.pytorch.strategies.DeepSpeedStrategy" or name):  # not a CPU subclass
            raise refuse("strategy", target or name, "ddp or auto on this CPU run: Lightning runs DeepSpeed on CUDA "
                         "GPUs only (or set trainer.accelerator=gpu on a GPU machine)")

