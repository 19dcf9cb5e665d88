"""Objects from a plain run config, without Hydra: the method, model, data, loggers and the per-task
Trainer factory. Used by the entry point and by ``gainlora.load_run``.

Nothing here imports or calls what a config names: every ``_target_`` goes through the allow-lists
of ``gainlora.schema`` first (``Bound``), so a config.yaml from elsewhere cannot run code.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import socket
import urllib.parse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from gainlora import fsdp
from gainlora.artifacts import RunDir
from gainlora.cli import writable_file
from gainlora.callbacks.best_state import BestTrainableState
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.tasks import load_stream
from gainlora.data.types import TaskData
from gainlora.dist import continual_strategy
from gainlora.methods.base import Method
from gainlora.model.backbone import adapted_layers, load_backbone
from gainlora.model.cache import cache_root
from gainlora.model.checkpointing import enable_gradient_checkpointing
from gainlora.model.module import ContinualLM
from gainlora.progress import quiet_lightning
from gainlora.report import ReportError, single_task_scores, tested_on
from gainlora.targets import (Bound, ConfigError, bind_logger, bind_method, bind_optimizer, bind_strategy, make,
                              refuse)

log = logging.getLogger("gainlora")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build_method(cfg: DictConfig) -> Method:
    return make(bind_method("method", plain(cfg.method)))


def is_deepspeed(cfg: DictConfig) -> bool:
    """Lightning's DeepSpeedStrategy or a subclass of it (by name: nothing is imported)."""
    return "deepspeed" in str(cfg.strategy.get("_target_", cfg.strategy.get("name", ""))).lower()


# -- batching --------------------------------------------------------------------------------------------
def world_size(trainer: DictConfig) -> int:
    devices = trainer.get("devices", 1)
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
                raise refuse("data.global_batch_size", global_batch, f"a multiple of data.batch_size "
                             f"({cfg.data.batch_size}) x {ranks} devices")
            derived, given = global_batch // per_step, cfg.trainer.accumulate_grad_batches
            if given not in (1, derived):  # it was replaced silently: the user's value never trained
                raise refuse("trainer.accumulate_grad_batches", given, f"1 or {derived} (data.global_batch_size="
                             f"{global_batch} over data.batch_size {cfg.data.batch_size} x {ranks} devices), or "
                             "set data.global_batch_size=null")
            cfg.trainer.accumulate_grad_batches = derived
        cfg.derived = {"world_size": ranks, "per_device_batch": cfg.data.batch_size,
                       "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
                       "global_batch": cfg.data.batch_size * ranks * cfg.trainer.accumulate_grad_batches}


# -- model and data ------------------------------------------------------------------------------------------
def check_rank(rank: int, backbone, name: str | None = None) -> None:
    """A LoRA factor wider than the projection it adapts adds nothing (InfLoRA's init fails on it, a huge
    one dies allocating): refuse it once the backbone's shapes are known, before any module or file is made.
    A backbone with no q/v projections to adapt (an encoder-only model) is refused here too."""
    try:
        layers = adapted_layers(backbone.model, backbone.kind)
    except ValueError as err:
        raise refuse("backbone.name_or_path", name, str(err)) from None
    widths = {min(linear.in_features, linear.out_features) for linear, _ in layers.values()}
    if widths and rank > min(widths):
        raise refuse("lora.rank", rank, f"at most {min(widths)} for this backbone (the smallest min(inputs, "
                     "outputs) of its adapted layers)")


T5_POSITIONS = 512  # the length T5 was pre-trained on; its relative positions set no hard limit


def answer_limit(config, kind: str, source_length: int) -> int | None:
    """The most answer tokens the backbone holds after a prompt of ``source_length`` tokens: a
    decoder-only model reads both in one sequence of its ``max_position_embeddings``; an
    encoder-decoder's answer gets the positions it declares (``n_positions``), else T5's 512."""
    declared = next((value for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                     if isinstance(value := getattr(config, key, None), int) and value > 0), None)
    if kind == "causal":
        return None if declared is None else declared - source_length
    return declared or T5_POSITIONS


def check_lengths(lengths: DictConfig, backbone) -> None:
    """Token lengths that fit the backbone's positions, refused before any module is made (131072 new
    tokens were accepted, and then every test batch generated for hours)."""
    source = lengths["max_source_length"]
    limit = answer_limit(backbone.model.config, backbone.kind, source)
    if limit is None:
        return
    if limit < 1:
        raise refuse("backbone.max_source_length", source, f"at most {source + limit - 1} (the backbone's "
                     f"{source + limit} positions hold the prompt and the answer)")
    for key in ("max_target_length", "max_new_tokens"):
        if lengths[key] > limit:
            where = (f"the backbone's {source + limit} positions less backbone.max_source_length {source}: the "
                     "prompt and the answer share them" if backbone.kind == "causal" else
                     f"an encoder-decoder's answer positions: its n_positions, else T5's pre-training length 512")
            raise refuse(f"backbone.{key}", lengths[key], f"at most {limit} ({where})")


def build_model(cfg: DictConfig, task_names: list[str]) -> tuple[ContinualLM, Method, Collator]:
    """The module (backbone + branch/gate registry), the method and the collator for a config."""
    quiet_lightning()  # before a tiny backbone's first build, whose save_pretrained imports DeepSpeed
    method = build_method(cfg)
    optimizer = bind_optimizer(plain(cfg.optimizer))
    overrides, corpus = cfg.backbone.get("tiny_overrides"), cfg.backbone.get("text_corpus")
    backbone = load_backbone(cfg.backbone.name_or_path, tiny=cfg.backbone.tiny, dtype=cfg.backbone.dtype,
                             cache_dir=cfg.paths.cache_dir,
                             tiny_overrides=OmegaConf.to_container(overrides) if overrides else None,
                             text_corpus=OmegaConf.to_container(corpus, resolve=True) if corpus else None,
                             attn_implementation=cfg.backbone.get("attn_implementation"))
    check_rank(cfg.lora.rank, backbone, cfg.backbone.name_or_path)
    check_lengths(cfg.backbone, backbone)
    module = ContinualLM(
        backbone, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, gates=method.gate_spec,
        optimizer=functools.partial(optimizer.cls, **optimizer.kwargs), task_names=task_names,
        generation={"max_new_tokens": cfg.backbone.max_new_tokens, "num_beams": cfg.generation.num_beams})
    if cfg.backbone.get("gradient_checkpointing"):
        enable_gradient_checkpointing(module.backbone, module.context)
    collator = Collator(backbone.tokenizer, backbone.kind, cfg.backbone.max_source_length,
                        cfg.backbone.max_target_length, chat_template=bool(cfg.backbone.get("chat_template")))
    return module, method, collator


def build(cfg: DictConfig, tasks: list[TaskData] | None = None) -> tuple[ContinualLM, TaskStreamDataModule, Method]:
    """Everything a run needs. The data is loaded and validated first, before anything heavy."""
    tasks = tasks if tasks is not None else load_stream(cfg.benchmark, seed=cfg.seed)
    module, method, collator = build_model(cfg, [t.name for t in tasks])
    datamodule = TaskStreamDataModule(tasks, collator, batch_size=cfg.data.batch_size,
                                      eval_batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                                      seed=cfg.seed)
    return module, datamodule, method


# A saved tokenizer writes at least one of these; without them T5's AutoTokenizer silently builds one
# of 100 extra ids and a few specials, which maps every word to <unk>.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def check_backbone_source(backbone: DictConfig, cache_dir: str | None = None, timeout: float = 2.0) -> None:
    """A named backbone must be a model directory, in the Hugging Face cache, or downloadable: known
    in about a second instead of minutes of connection retries and a traceback. A tiny one is built
    into ``cache_dir``, which must then be a folder or one that can be made."""
    name = backbone.get("name_or_path")
    if backbone.get("tiny"):
        root = cache_root(cache_dir)
        unwritable = None if root.is_dir() else writable_file(root / "probe")
        if unwritable:
            raise refuse("paths.cache_dir", cache_dir, f"a folder for the tiny backbones ({unwritable}); set "
                         "GAINLORA_CACHE to one")
    if backbone.get("tiny") and backbone.get("text_corpus"):  # its pre-training text must be there
        from gainlora.model.pretrain import TextCorpus

        TextCorpus.from_config(OmegaConf.to_container(backbone.text_corpus, resolve=True)).files()
    if backbone.get("tiny") or not name:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise refuse("backbone.name_or_path", name, "a model directory (with config.json) or a Hugging Face "
                         "name; this directory has no config.json")
        if not any(next(path.glob(f"*.{suffix}"), None) for suffix in ("safetensors", "bin", "index.json")):
            raise refuse("backbone.name_or_path", name, "a model directory with its weights (model.safetensors or "
                         "pytorch_model.bin, or their sharded index); this one has config.json only")
        if not any((path / file).is_file() for file in TOKENIZER_FILES):  # transformers makes an empty-vocabulary one
            raise refuse("backbone.name_or_path", name, f"a model directory with its tokenizer (one of "
                         f"{', '.join(TOKENIZER_FILES)}); this one has none")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise refuse("backbone.name_or_path", name, "a model directory or a Hugging Face name (owner/model); "
                     "no such directory")
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a valid repository id
        raise refuse("backbone.name_or_path", name, "a model directory or a Hugging Face name (owner/model)") from None
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = urllib.parse.urlsplit(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or "")
    host, port = (proxy.hostname, proxy.port or 80) if proxy.hostname else (endpoint.hostname, endpoint.port or 443)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError:
            pass
    raise refuse("backbone.name_or_path", name, f"not in the Hugging Face cache and {host} cannot be reached "
                 f"{'(HF_HUB_OFFLINE is set)' if offline else 'from here'}, so it cannot be downloaded; the paper "
                 "experiments need a GPU machine with the model cached or network access; on a CPU, add "
                 "debug=cpu_tiny (a tiny local backbone of the same family)")


def single_task_reference(cfg: DictConfig, task_names: list[str]) -> list[float] | None:
    """S[j] from ``metrics.single_task_run`` (a finished method=single_task run over the same tasks),
    checked before anything is trained; None when the key is unset."""
    path = cfg.get("metrics", {}).get("single_task_run")
    if not path:
        return None
    kind = bind_method("method", plain(cfg.method)).cls.run_kind
    if kind != "continual":
        raise ConfigError(f"metrics.single_task_run={path}: FWT applies to continual methods, not to the {kind} "
                          "reference run; unset it")
    try:
        return single_task_scores(Path(path), task_names)
    except ReportError as err:
        raise ConfigError(f"metrics.single_task_run={path}: {err}") from None


def check_reference_tests(cfg: DictConfig, tasks: list[TaskData]) -> None:
    """FWT subtracts S[j] from R[j][j]: both must score the same test examples (``report.tested_on``)."""
    path = cfg.get("metrics", {}).get("single_task_run")
    if not path:
        return
    theirs = tested_on(path, [task.name for task in tasks])
    for j, task in enumerate(tasks):
        if j not in theirs:
            raise ConfigError(f"metrics.single_task_run={path}: task {j + 1}'s folder holds no readable test "
                              "predictions")
        if theirs[j] != [(e.source, list(e.references)) for e in task.test]:
            raise ConfigError(f"metrics.single_task_run={path}: task {task.name} was tested on other examples "
                              "than this run's (another seed or other data); FWT needs the same test sets")


# -- Lightning: loggers, trainers, checkpoints ----------------------------------------------------------------
def make_loggers(cfg: DictConfig) -> list:
    return [make(bind_logger(name, spec)) for name, spec in plain(cfg.logger or {}).items() if spec is not None]


def trainer_factory(cfg: DictConfig, run_dir: RunDir, loggers: list):
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = bind_strategy(plain(cfg.strategy))
    if isinstance(strategy, Bound):  # DeepSpeed: the accumulation fix and the ZeRO-3 handover
        strategy = Bound(continual_strategy(strategy.cls), strategy.kwargs, strategy.label)
    quiet_lightning()  # no accelerator banner, tips or deprecation lines from every task's Trainer

    def make_trainer(task: int, callbacks: list, steps_scale: int = 1) -> L.Trainer:
        kwargs = dict(trainer_kwargs)
        if kwargs.get("max_steps", -1) > 0:  # max_steps is per task: a joint fit on k tasks gets k times it
            kwargs["max_steps"] *= steps_scale
        if kwargs.get("limit_val_batches"):  # validation on: keep the best-scoring weights
            callbacks = [*callbacks, BestTrainableState()]
        # The loop's InTaskCheckpoint saves what trains; Lightning's own would save the whole model.
        kwargs["enable_checkpointing"] = False
        return L.Trainer(**kwargs, strategy=make(strategy) if isinstance(strategy, Bound) else strategy,
                         logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir.root))
    return make_trainer


def check_trainer(cfg: DictConfig) -> None:
    """Lightning's own checks of the trainer and strategy settings (devices, precision, the strategy's
    packages), made now on a throwaway Trainer instead of when the first task's Trainer is built."""
    kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "enable_checkpointing": False}
    strategy = bind_strategy(plain(cfg.strategy))
    logging.disable(logging.INFO)  # its "GPU available" lines come when the first task's Trainer is made
    try:
        L.Trainer(**kwargs, strategy=make(strategy) if isinstance(strategy, Bound) else strategy, logger=False)
    except (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError) as err:
        message = str(err).splitlines()[0]
        # the key Lightning's message names (`devices` ...), else the one whose value it quotes (Timer(duration='abc'))
        named = next((k for k in kwargs if re.search(rf"\b{k}\b", message)), None) or next(
            (k for k, v in kwargs.items() if isinstance(v, str) and v and f"'{v}'" in message), None)
        if named is not None:
            raise refuse(f"trainer.{named}", kwargs[named], f"lightning.Trainer refuses it: {message}") from None
        raise ConfigError(f"trainer: lightning.Trainer refuses these settings: {message}") from None
    finally:
        logging.disable(logging.NOTSET)


def check_val_interval(cfg: DictConfig, tasks: list[TaskData]) -> None:
    """An integer trainer.val_check_interval counts an epoch's training batches: past the shortest
    task's epoch, Lightning refuses it only when that task's fit starts (a traceback, tasks in)."""
    trainer = cfg.trainer
    interval, limit = trainer.get("val_check_interval"), trainer.get("limit_train_batches")
    if not isinstance(interval, int) or isinstance(interval, bool) or trainer.get("check_val_every_n_epoch", 1) is None:
        return
    ranks = cfg.derived.world_size
    batches = min(math.ceil(math.ceil(len(task.train) / ranks) / cfg.data.batch_size) for task in tasks)
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    if interval > batches:
        raise refuse("trainer.val_check_interval", interval, f"at most {batches} (the training batches of an epoch of "
                     "the smallest task), a fraction of an epoch, or with trainer.check_val_every_n_epoch=null")


def in_task_checkpoints(cfg: DictConfig) -> dict | None:
    """The loop's in-task checkpoint cadence, or None. Off under DeepSpeed: its checkpoints are engine
    folders that DeepSpeed loads by unpickling, and artifacts must load without pickle; such runs
    resume at task granularity."""
    spec = OmegaConf.to_container(cfg.checkpoint) if cfg.get("checkpoint") else {}
    if not (spec.get("every_n_epochs") or spec.get("every_n_train_steps")):
        return None
    if is_deepspeed(cfg):
        log.info("in-task checkpoints are off under DeepSpeed; an interrupted task restarts on resume")
        return None
    if fsdp.configured(cfg.strategy):  # its sharded checkpoints are folders with a pickled metadata file
        log.info("in-task checkpoints are off under FSDP; an interrupted task restarts on resume")
        return None
    return spec
