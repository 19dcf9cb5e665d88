"""Entry point: ``python -m gainlora.run [experiment=NAME] [key=value ...]`` (``make run``).

Builds everything once from the Hydra config, validates it before any training, then runs the
continual loop and prints the path of results.json last.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class, instantiate
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from gainlora.artifacts import RunDir, write_text
from gainlora.callbacks.best_state import BestTrainableState
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.tasks import load_stream, stream_metric
from gainlora.data.types import DataError, TaskData
from gainlora.loop import ArtifactError, ContinualLoop, StopFlag, TaskInterrupted
from gainlora.methods.base import Method
from gainlora.model.backbone import load_backbone
from gainlora.model.module import ContinualLM
from gainlora.report import ReportError, single_task_scores
from gainlora.wandb_logging import log_task_end

log = logging.getLogger("gainlora")
CONF_DIR = Path(os.environ.get("GAINLORA_CONF", Path(__file__).resolve().parents[2] / "conf"))


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def strategy_target(cfg: DictConfig) -> str:
    return str(cfg.strategy.get("_target_", cfg.strategy.get("name", "")))


def is_deepspeed(cfg: DictConfig) -> bool:
    """Lightning's DeepSpeedStrategy or a subclass of it (by name: nothing is imported)."""
    return "DeepSpeed" in strategy_target(cfg)


def validate_config(cfg: DictConfig) -> None:
    """Cheap checks of the values a run depends on, before anything is loaded or trained."""
    def positive(key: str, value) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")

    positive("lora.rank", cfg.lora.rank)
    positive("lora.alpha", cfg.lora.alpha)
    positive("optimizer.lr", cfg.optimizer.lr)
    positive("data.batch_size", cfg.data.batch_size)
    if not (cfg.backbone.get("name_or_path") or cfg.backbone.get("tiny")):
        raise ConfigError("backbone: set backbone.name_or_path (a Hugging Face name or a local path) or backbone.tiny")
    target = strategy_target(cfg)
    if is_deepspeed(cfg) and cfg.strategy.get("stage") == 3:
        # Measured with the CPU shim: task 1 trains and generates, then IncLoRA fails at task 2 (the
        # new Trainer's engine meets the last one's partitioned parameters and hooks) and InfLoRA
        # hangs collecting features outside the engine; GainLoRA's gate projection would also need
        # gathered gate parameters.
        raise ConfigError("strategy deepspeed_stage_3 is not supported: a continual run rebuilds the DeepSpeed "
                          "engine for every task and ZeRO-3's partitioned parameters do not survive the "
                          "handover; use deepspeed_stage_2 or deepspeed_stage_2_offload")
    accelerator = cfg.trainer.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if target == "lightning.pytorch.strategies.DeepSpeedStrategy" and on_cpu:
        raise ConfigError("strategy deepspeed_*: Lightning runs DeepSpeed on CUDA GPUs only and this run would "
                          "use the CPU; use strategy=ddp (or auto) here, or set trainer.accelerator=gpu on a GPU machine")


def build_method(cfg: DictConfig) -> Method:
    spec = OmegaConf.to_container(cfg.method, resolve=True)
    label = spec.pop("name", None)
    if "_target_" not in spec:
        raise ConfigError("method: no _target_; choose one of conf/method/*.yaml")
    method = instantiate(spec, _convert_="all")
    if label:
        method.name = label
    return method


def build_model(cfg: DictConfig, task_names: list[str]) -> tuple[ContinualLM, Method, Collator]:
    """The module (backbone + branch/gate registry), the method and the collator for a config."""
    method = build_method(cfg)
    overrides, corpus = cfg.backbone.get("tiny_overrides"), cfg.backbone.get("text_corpus")
    backbone = load_backbone(cfg.backbone.name_or_path, tiny=cfg.backbone.tiny, dtype=cfg.backbone.dtype,
                             cache_dir=cfg.paths.cache_dir,
                             tiny_overrides=OmegaConf.to_container(overrides) if overrides else None,
                             text_corpus=OmegaConf.to_container(corpus, resolve=True) if corpus else None)
    module = ContinualLM(
        backbone, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, gates=method.gate_spec,
        optimizer=instantiate(cfg.optimizer), task_names=task_names,
        generation={"max_new_tokens": cfg.backbone.max_new_tokens, "num_beams": cfg.generation.num_beams})
    collator = Collator(backbone.tokenizer, backbone.kind, cfg.backbone.max_source_length,
                        cfg.backbone.max_target_length)
    return module, method, collator


def build(cfg: DictConfig, tasks: list[TaskData] | None = None) -> tuple[ContinualLM, TaskStreamDataModule, Method]:
    """Everything a run needs. The data is loaded and validated first, before anything heavy."""
    tasks = tasks if tasks is not None else load_stream(cfg.benchmark, seed=cfg.seed)
    module, method, collator = build_model(cfg, [t.name for t in tasks])
    datamodule = TaskStreamDataModule(tasks, collator, batch_size=cfg.data.batch_size,
                                      eval_batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                                      seed=cfg.seed)
    return module, datamodule, method


def single_task_reference(cfg: DictConfig, task_names: list[str]) -> list[float] | None:
    """S[j] from ``metrics.single_task_run`` (a finished method=single_task run over the same tasks),
    checked before anything is trained; None when the key is unset."""
    path = cfg.get("metrics", {}).get("single_task_run")
    if not path:
        return None
    target = cfg.method.get("_target_")
    kind = getattr(get_class(target), "run_kind", "continual") if target else "continual"
    if kind != "continual":
        raise ConfigError(f"metrics.single_task_run: FWT applies to continual methods, not to the {kind} "
                          "reference run; unset it")
    try:
        return single_task_scores(Path(path), task_names)
    except ReportError as err:
        raise ConfigError(f"metrics.single_task_run: {err}") from None


def resolve_run_dir(cfg: DictConfig) -> RunDir:
    base = Path(cfg.paths.runs_dir) / cfg.exp_name
    run_id = cfg.run_id
    if run_id is None and cfg.resume:
        unfinished = sorted(p for p in base.glob("*") if (p / "config.yaml").is_file()
                            and '"status": "finished"' not in _read(p / "results.json"))
        if not unfinished:
            raise ConfigError(f"resume=true: no unfinished run under {base}; name one with run_id=...")
        return RunDir(unfinished[-1])
    return RunDir(base / str(run_id if run_id is not None else datetime.now().strftime("%Y%m%d-%H%M%S")))


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def make_loggers(cfg: DictConfig, run_dir: RunDir) -> list:
    loggers = []
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        loggers.append(instantiate(spec))
    return loggers


def log_task_metrics(loggers: list, task: int, results: dict) -> None:
    """Continual-learning metrics after each task, against the task index (never a global step)."""
    row = results["matrix"][-1]  # the row just added (a joint fit's only row covers every task)
    metrics = {"cl/task": task + 1, **{f"cl/{k}": results[k] for k in ("AP", "FT", "BWT") if results[k] is not None},
               **{f"cl/score/{name}": row[j] for j, name in enumerate(results["tasks"][: task + 1])}}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            continue  # W&B gets its own step metric, tables and plots (log_task_end)
        logger.log_metrics(metrics, step=task)
        logger.save()
    log_task_end(loggers, task, results)


def world_size(trainer: DictConfig) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices != "auto":
        devices = int(devices) if devices.isdigit() else len(devices.split(","))
    if devices == "auto" or devices == -1:
        devices = torch.cuda.device_count() if torch.cuda.is_available() and trainer.accelerator != "cpu" else 1
    elif not isinstance(devices, int):
        devices = len(devices)
    return max(int(devices), 1) * int(trainer.get("num_nodes", 1))


def derive_batching(cfg: DictConfig) -> None:
    """Gradient accumulation that keeps data.global_batch_size whatever the number of devices."""
    ranks = world_size(cfg.trainer)
    global_batch = cfg.data.get("global_batch_size")
    with open_dict(cfg):
        if global_batch:
            per_step = cfg.data.batch_size * ranks
            if global_batch % per_step:
                raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of data.batch_size "
                                  f"({cfg.data.batch_size}) x {ranks} devices")
            cfg.trainer.accumulate_grad_batches = global_batch // per_step
        cfg.derived = {"world_size": ranks, "per_device_batch": cfg.data.batch_size,
                       "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
                       "global_batch": cfg.data.batch_size * ranks * cfg.trainer.accumulate_grad_batches}


def trainer_factory(cfg: DictConfig, run_dir: RunDir, loggers: list):
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)

    def make(task: int, callbacks: list, steps_scale: int = 1) -> L.Trainer:
        kwargs = dict(trainer_kwargs)
        if kwargs.get("max_steps", -1) > 0:  # max_steps is per task: a joint fit on k tasks gets k times it
            kwargs["max_steps"] *= steps_scale
        if kwargs.get("limit_val_batches"):  # validation on: keep the best-scoring weights
            callbacks = [*callbacks, BestTrainableState()]
        # Lightning refuses a ModelCheckpoint when checkpointing is off, and adds its own (of the
        # whole model) when it is on without one: on exactly when the loop passes its own.
        kwargs["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        strategy = cfg.strategy
        strategy = instantiate(strategy) if "_target_" in strategy else strategy.name
        return L.Trainer(**kwargs, strategy=strategy, logger=loggers, callbacks=callbacks,
                         default_root_dir=str(run_dir.root))
    return make


def in_task_checkpoints(cfg: DictConfig) -> dict | None:
    """The loop's ModelCheckpoint cadence, or None. Off under DeepSpeed: its checkpoints are engine
    folders that DeepSpeed loads by unpickling, and artifacts must load without pickle; such runs
    resume at task granularity."""
    spec = OmegaConf.to_container(cfg.checkpoint) if cfg.get("checkpoint") else {}
    if not (spec.get("every_n_epochs") or spec.get("every_n_train_steps")):
        return None
    if is_deepspeed(cfg):
        log.info("in-task checkpoints are off under DeepSpeed; an interrupted task restarts on resume")
        return None
    return spec


RUN_ID_ENV = "GAINLORA_RUN_ID"
# Keys that may differ between an interrupted run and its resumption.
RESUMABLE_KEYS = {"resume", "run_id", "paths", "logger", "trainer.enable_progress_bar", "derived", "checkpoint"}


def config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """Dotted keys whose values differ, ignoring those a resume may change."""
    a = OmegaConf.to_container(saved, resolve=True)
    b = OmegaConf.to_container(current, resolve=True)
    diffs: list[str] = []

    def walk(x, y, prefix: str) -> None:
        if prefix.rstrip(".") in RESUMABLE_KEYS or prefix.split(".")[0] in RESUMABLE_KEYS:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):  # order keys mix ints and names
                walk(x.get(key), y.get(key), f"{prefix}{key}.")
        elif x != y:
            diffs.append(f"{prefix.rstrip('.')}: {x!r} -> {y!r}")

    walk(a, b, "")
    return diffs


def is_main_process() -> bool:
    """Global rank 0. Ranks launched by Lightning re-run this script with their rank in the env."""
    return rank_zero_only.rank == 0


def prepare_run_dir(cfg: DictConfig) -> RunDir:
    if not is_main_process():  # a DDP/DeepSpeed worker: join the directory rank 0 made
        with open_dict(cfg):
            cfg.run_id = cfg.run_id or os.environ[RUN_ID_ENV]
            cfg.paths.run_dir = str(resolve_run_dir(cfg).root)
        return RunDir(cfg.paths.run_dir)
    run_dir = resolve_run_dir(cfg)
    os.environ[RUN_ID_ENV] = run_dir.root.name  # inherited by the worker processes Lightning launches
    if run_dir.config.exists() and not cfg.resume:
        raise ConfigError(f"{run_dir.root} already holds a run; pass resume=true or a new run_id")
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir.root)
        cfg.run_id = run_dir.root.name
    if cfg.resume and run_dir.config.exists():
        diffs = config_differences(OmegaConf.load(run_dir.config), cfg)
        if diffs:
            raise ConfigError(f"resume: {run_dir.config} was made with another config; differing keys: "
                              + "; ".join(diffs[:5]))
    return run_dir


def run(cfg: DictConfig) -> dict:
    validate_config(cfg)
    derive_batching(cfg)
    run_dir = prepare_run_dir(cfg)
    tasks = load_stream(cfg.benchmark, seed=cfg.seed)
    single_task = single_task_reference(cfg, [t.name for t in tasks])
    module, datamodule, method = build(cfg, tasks)
    if is_main_process():
        run_dir.root.mkdir(parents=True, exist_ok=True)
        write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
    loggers = make_loggers(cfg, run_dir)
    info = {"experiment": cfg.exp_name, "method": method.name, "benchmark": cfg.benchmark.name,
            "order": cfg.benchmark.get("order"), "metric": stream_metric(datamodule.tasks), "seed": cfg.seed,
            "selection": cfg.benchmark.get("selection", "carved"), "backbone": module.backbone.name_or_path,
            "derived": OmegaConf.to_container(cfg.derived)}  # world size, per-device and global batch
    if single_task is not None:
        info["single_task_run"] = str(cfg.metrics.single_task_run)
    started = time.time()
    stop = StopFlag()
    stop.install()
    loop = ContinualLoop(module=module, datamodule=datamodule, method=method, run_dir=run_dir,
                         make_trainer=trainer_factory(cfg, run_dir, loggers), info=info, seed=cfg.seed,
                         progress_bar=cfg.trainer.enable_progress_bar,
                         on_task_end=lambda t, results: log_task_metrics(loggers, t, results),
                         is_main=is_main_process(), stop=stop, single_task=single_task,
                         checkpoint=in_task_checkpoints(cfg))
    try:
        results = loop.run()
    except TaskInterrupted as err:
        loop.write_results(status="interrupted", wall_time=time.time() - started)
        print(f"interrupted: {err} (run_id={run_dir.root.name})", file=sys.stderr)
        sys.exit(143)
    except BaseException as err:  # finished tasks stay on disk; say what stopped the run
        loop.write_results(status=f"failed: {type(err).__name__}: {err}"[:500], wall_time=time.time() - started)
        raise
    finally:
        for logger in loggers:
            logger.finalize("success")
    if is_main_process():
        print("  ".join(f"{k} {results[k]:.2f}" for k in ("AP", "FT", "BWT", "FWT") if results[k] is not None))
        print(run_dir.results)
    return results


USER_ERRORS = (ConfigError, DataError, ArtifactError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["AP"]
    except USER_ERRORS as err:  # one clear line, no traceback, for mistakes in the input
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
