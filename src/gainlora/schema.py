"""The run configuration's schema: every user-facing key typed and ranged, checked before anything is
built or written.

Validation runs on the resolved config as JSON data in pydantic's strict mode, so a value is what
the user typed (an int may stand for a float; "3" is not a number, 4.0 is not an int, 1 is not a
bool, NaN and inf are refused). Unknown keys are refused, so a typo fails instead of being ignored.
Objects named by ``_target_`` are resolved here against allow-lists, never imported from anywhere
else: a config.yaml from someone else's run directory can only name the project's own methods,
``torch.optim`` optimizers, Lightning strategies and loggers. Their arguments are bound to the
constructor's signature, so a method file carries its own constraints as annotations
(``Annotated[float, Field(gt=0, le=1)]``).

A bad value raises ``ConfigError("<dotted.key>=<value>: <what is accepted>")``.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, model_validator

from gainlora.data.tasks import READERS

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
MISSING = object()


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is accepted."""


def show(value: Any) -> str:
    text = "<missing>" if value is MISSING else value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: {accepted}")


def check_name(key: str, value: Any) -> str:
    """A run id or experiment name: one path component, never a path."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not (isinstance(value, str) and NAME.fullmatch(value) and value not in (".", "..")):
        raise refuse(key, value, "a name of 1-100 characters from A-Z a-z 0-9 . _ - (not a path, not '.' or '..')")
    return value


# -- the sections ----------------------------------------------------------------------------------------
PosInt = Annotated[int, Field(gt=0)]
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
    num_beams: PosInt


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


class Backbone(Section):
    family: Literal["t5", "llama"] | None = None
    name_or_path: Annotated[str, Field(min_length=1)] | None
    tiny: str | None
    tiny_overrides: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16", "float16"]
    max_source_length: PosInt
    max_target_length: PosInt
    max_new_tokens: PosInt

    @model_validator(mode="after")
    def one_source(self) -> Backbone:
        from gainlora.model.tiny import PRESETS, TinySpec

        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("backbone.name_or_path: set exactly one of backbone.name_or_path (a Hugging Face "
                             "name or a local directory) and backbone.tiny (a local preset)")
        if self.tiny is not None and self.tiny not in PRESETS:
            raise ValueError(f"backbone.tiny: one of {', '.join(PRESETS)}")
        unknown = sorted(set(self.tiny_overrides or {}) - {f.name for f in fields(TinySpec)} - {"name"})
        if unknown:
            raise ValueError(f"backbone.tiny_overrides.{unknown[0]}: unknown field; the preset fields are "
                             + ", ".join(f.name for f in fields(TinySpec)))
        return self


class Benchmark(Section):
    name: str
    reader: Literal[READERS]  # type: ignore[valid-type]
    data_dir: str | None = None
    order: int | str | None = None
    orders: dict[str, list[str]] | None = None
    tasks: Annotated[list[str], Field(min_length=1)] | None = None
    num_tasks: PosInt | None = None
    n_train: PosInt | None = None  # demo reader
    n_val: NonNegInt | None = None
    n_test: PosInt | None = None
    max_train_per_task: PosInt | None = None
    max_eval_per_task: PosInt | None = None
    val_size: Annotated[float, Field(ge=0, lt=1)] | None = None  # superni / long readers
    selection: Literal["carved", "paper"] = "carved"

    def available(self) -> list[str]:
        if self.tasks is not None:
            return self.tasks
        for key, tasks in (self.orders or {}).items():
            if key == str(self.order):
                return tasks
        known = ", ".join(self.orders or {}) or "none"
        raise ValueError(f"benchmark.order: one of {known} (the orders of benchmark {self.name})")

    @model_validator(mode="after")
    def consistent(self) -> Benchmark:
        available = self.available()
        if self.num_tasks is not None and self.num_tasks > len(available):
            raise ValueError(f"benchmark.num_tasks: 1 to {len(available)} (the tasks available), or null for all")
        ignored = ("data_dir", "val_size") if self.reader == "demo" else ("n_train", "n_val", "n_test")
        for key in ignored:
            if getattr(self, key) is not None:
                raise ValueError(f"benchmark.{key}: the {self.reader} reader does not read it; leave it unset")
        return self


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
        if self.max_steps == 0 or self.max_epochs == 0:
            key = "trainer.max_steps" if self.max_steps == 0 else "trainer.max_epochs"
            raise ValueError(f"{key}: a positive limit, or -1 for none (0 trains nothing)")
        if self.max_steps == -1 and (self.max_epochs is None or self.max_epochs < 0):
            raise ValueError("trainer.max_steps: a positive limit when trainer.max_epochs is unlimited "
                             "(both unlimited would train forever)")
        return self


class RunConfig(Section):
    exp_name: str
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
    derived: dict[str, Any] | None = None  # written by the run (gainlora.build.derive_batching)


# -- objects named by _target_ ----------------------------------------------------------------------------
@dataclass
class Bound:
    """A class from an allow-list and its validated keyword arguments (nested methods bound too)."""
    cls: type
    kwargs: dict[str, Any]
    label: str | None = None


def method_names() -> list[str]:
    import gainlora.methods as methods

    return sorted(f"gainlora.methods.{n}" for n in methods.__all__ if n != "Method")


def allowed_class(key: str, target: Any, modules: tuple[str, ...], base: type, what: str, known: list[str]) -> type:
    """The class ``target`` names, if it lives under one of ``modules`` and subclasses ``base``;
    nothing outside those modules is ever imported."""
    ok = isinstance(target, str) and any(target.startswith(m + ".") for m in modules)
    if ok:
        module, _, name = target.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        ok = (isinstance(found, type) and issubclass(found, base)
              and any(found.__module__ == m or found.__module__.startswith(m + ".") for m in modules))
    if not ok:
        raise refuse(f"{key}._target_", target if isinstance(target, str) else show(target),
                     f"not one of the project's {what} ({', '.join(known)})")
    return found


def bind(key: str, cls: type, spec: dict, *, skip: tuple[str, ...] = ()) -> dict:
    """Validate ``spec`` against ``cls.__init__``'s signature and annotations: unknown keys, types
    and the ranges that ``Annotated[..., Field(...)]`` annotations state are checked."""
    params = inspect.signature(cls).parameters
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except (NameError, TypeError):
        hints = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    found: dict[str, Any] = {}
    for name, param in params.items():
        if name in skip or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        annotation = hints.get(name, Any)
        try:
            TypeAdapter(annotation, config=None if _is_model(annotation) else STRICT)
        except Exception:  # an annotation pydantic cannot check (e.g. a torch type): take any value
            annotation = Any
        found[name] = (annotation, ... if param.default is param.empty else param.default)
    model = create_model(f"{cls.__name__}Arguments", __config__=ConfigDict(
        STRICT, extra="allow" if open_ended else "forbid"), **found)
    try:
        valid = model.model_validate_json(json.dumps(spec))
    except ValidationError as err:
        raise from_pydantic(err, spec, key, model) from None
    return {name: getattr(valid, name) for name in spec if name in found} | dict(valid.model_extra or {})


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def bind_method(key: str, spec: Any) -> Bound:
    """A method section: its class (allow-listed) and validated arguments; a parameter annotated
    with a Method type (GainLoRA's ``branches``) takes a nested method section."""
    from gainlora.methods.base import Method

    if not isinstance(spec, dict):
        raise refuse(key, spec, "a method section with _target_ (conf/method/*.yaml)")
    spec = dict(spec)
    cls = allowed_class(key, spec.pop("_target_", MISSING), ("gainlora.methods",), Method, "methods",
                        method_names())
    label = spec.pop("name", None)
    if label is not None and not isinstance(label, str):
        raise refuse(f"{key}.name", label, "a string label")
    hints = _hints(cls)
    nested = {name: bind_method(f"{key}.{name}", spec.pop(name)) for name, hint in hints.items()
              if name in spec and isinstance(hint, type) and issubclass(hint, Method)}
    for name, value in spec.items():
        if isinstance(value, dict) and "_target_" in value:
            raise refuse(f"{key}.{name}", value.get("_target_"), f"{cls.__name__}.{name} takes a plain value")
    return Bound(cls, {**bind(key, cls, spec, skip=tuple(nested)), **nested}, label)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        return {}


def bind_optimizer(spec: dict) -> Bound:
    spec = dict(spec)
    known = ["torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "..."]
    cls = allowed_class("optimizer", spec.pop("_target_", MISSING), ("torch.optim",), torch.optim.Optimizer,
                        "optimizers", known)
    partial = spec.pop("_partial_", MISSING)
    if partial is not True:
        raise refuse("optimizer._partial_", partial, "true (the module passes the parameters)")
    kwargs = bind("optimizer", cls, spec, skip=("params",))
    # torch checks these only when the optimizer is made, once training has started
    if not isinstance(kwargs.get("lr", 1.0), (int, float)) or not kwargs.get("lr", 1.0) > 0:
        raise refuse("optimizer.lr", spec.get("lr"), "a number > 0")
    if kwargs.get("weight_decay", 0.0) < 0:
        raise refuse("optimizer.weight_decay", spec["weight_decay"], "a number >= 0")
    return Bound(cls, kwargs)


def bind_strategy(spec: dict) -> Bound | str:
    """A Lightning strategy by registry name (``name: auto``) or class (``_target_``) with arguments."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    spec = dict(spec)
    if "_target_" not in spec:
        names = ["auto", *StrategyRegistry.available_strategies()]
        if set(spec) != {"name"} or spec["name"] not in names:
            raise refuse("strategy.name", spec.get("name", MISSING), f"one of {', '.join(names)} (or a _target_)")
        return spec["name"]
    cls = allowed_class("strategy", spec.pop("_target_"), ("lightning.pytorch.strategies",), Strategy,
                        "strategies", ["lightning.pytorch.strategies.DDPStrategy", "...DeepSpeedStrategy"])
    return Bound(cls, bind("strategy", cls, spec))


LOGGERS = ("gainlora.csv_logger.RunCSVLogger", "gainlora.wandb_logging.make_wandb_logger")


def bind_logger(name: str, spec: dict) -> Bound:
    """Lightning's loggers or the project's two (the run's metrics.csv, the W&B factory)."""
    from lightning.pytorch.loggers import Logger

    key, spec = f"logger.{name}", dict(spec)
    target = spec.pop("_target_", MISSING)
    spec.pop("_recursive_", None)  # nothing is built recursively: nested values stay plain data
    if target in LOGGERS:
        module, _, attr = target.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
    else:
        cls = allowed_class(key, target, ("lightning.pytorch.loggers",), Logger, "loggers",
                            [*LOGGERS, "lightning.pytorch.loggers.*"])
    return Bound(cls, bind(key, cls, spec))


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
    bind_method("method", data["method"])
    bind_optimizer(data["optimizer"])
    bind_strategy(data["strategy"])
    for name, spec in (data["logger"] or {}).items():
        if spec is not None:
            bind_logger(name, spec)
    if machine:
        check_machine(valid, data["strategy"])
    return valid


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
    if isinstance(trainer.devices, int) and trainer.devices > 1 and not on_cpu \
            and trainer.devices > torch.cuda.device_count():
        raise refuse("trainer.devices", trainer.devices, f"at most {torch.cuda.device_count()} (the GPUs here)")
    if "DeepSpeed" in str(strategy.get("_target_", strategy.get("name", ""))).replace("deepspeed", "DeepSpeed"):
        if strategy.get("stage") == 3 or "stage_3" in str(strategy.get("name")):
            # Measured with the CPU shim: task 1 trains, then IncLoRA fails at task 2 (the new
            # Trainer's engine meets the last one's partitioned parameters) and InfLoRA hangs
            # collecting features outside the engine (docs/architecture.md, "Several processes").
            raise refuse("strategy", "deepspeed_stage_3", "deepspeed_stage_3 is not supported: a continual run "
                         "rebuilds the DeepSpeed engine for every task and ZeRO-3's partitioned parameters do "
                         "not survive the handover; use deepspeed_stage_2 or deepspeed_stage_2_offload")
        if on_cpu:
            raise refuse("strategy", "deepspeed", "ddp or auto on this CPU run: Lightning runs DeepSpeed on CUDA "
                         "GPUs only (or set trainer.accelerator=gpu on a GPU machine)")


def from_pydantic(err: ValidationError, data: Any, prefix: str = "", model: type[BaseModel] | None = None) -> ConfigError:
    """One line for the first offending key: ``key=value: what is accepted``."""
    first = err.errors()[0]
    path, node, parent = [], data, None
    for part in first["loc"]:  # keep the config keys, drop pydantic's union-member tags
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and part < len(node):
            path.append(part)
            parent, node = node, node[part]
        elif first["type"] == "missing" and not isinstance(node, list):
            path.append(part)
            node = MISSING
            break
        else:
            break
    key = ".".join(map(str, filter(lambda p: p != "", [prefix, *path]))) or "config"
    if first["type"] == "value_error":  # a model validator: its message names its own key
        own, _, accepted = first["msg"].removeprefix("Value error, ").partition(": ")
        return ConfigError(f"{own}={show(_lookup(data, own.split('.')))}: {accepted}")
    if first["type"] == "extra_forbidden":
        return ConfigError(f"{key}={show(first['input'])}: unknown key (a typo?)")
    if first["type"] == "missing":
        if isinstance(node, list):  # a fixed-length list that is too short
            return ConfigError(f"{key}={show(node)}: should have more items ({len(node)} given)")
        return ConfigError(f"{key}=<missing>: required")
    same = [e for e in err.errors() if tuple(e["loc"][: len(path)]) == tuple(path)]
    wanted = []
    for e in same:
        text = re.sub(r"^(Input|String|List|Value|Dictionary) should (be )?", "", e["msg"])
        text = re.sub(r" after validation, not \d+", "", text)
        if text not in wanted:
            wanted.append(text.replace("None", "null").replace("array", "list"))
    if model is not None and path and "null" not in wanted and _accepts_null(model, data, path):
        wanted.append("null")
    value = node if path else first["input"]
    verb = "should be " if not wanted[0].startswith("have ") else "should "
    accepted = " or ".join(wanted)
    return ConfigError(f"{key}={show(value)}: {verb}" + (accepted.replace(" or null", " or be null")
                                                         if verb == "should " else accepted))


def _accepts_null(model: type[BaseModel], data: Any, path: list) -> bool:
    """Whether ``null`` at ``path`` would pass (to say so in the message)."""
    copy = json.loads(json.dumps(data, default=str))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = None
    try:
        model.model_validate_json(json.dumps(copy))
    except ValidationError as err:
        return not any(tuple(e["loc"][: len(path)]) == tuple(path) for e in err.errors())
    return True


def _lookup(data: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data
