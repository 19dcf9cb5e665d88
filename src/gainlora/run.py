"""Entry point: ``python -m gainlora.run [experiment=NAME] [key=value ...]`` (``make run``).

Builds everything once from the Hydra config, validates it before any training, then runs the
continual loop and prints the path of results.json last.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gainlora.artifacts import RunDir, write_text
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.tasks import load_stream, stream_metric
from gainlora.loop import ContinualLoop
from gainlora.methods.base import Method
from gainlora.model.backbone import load_backbone
from gainlora.model.module import ContinualLM

log = logging.getLogger("gainlora")
CONF_DIR = Path(os.environ.get("GAINLORA_CONF", Path(__file__).resolve().parents[2] / "conf"))


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def build_method(cfg: DictConfig) -> Method:
    spec = OmegaConf.to_container(cfg.method, resolve=True)
    label = spec.pop("name", None)
    if "_target_" not in spec:
        raise ConfigError("method: no _target_; choose one of conf/method/*.yaml")
    method = instantiate(spec, _convert_="all")
    if label:
        method.name = label
    return method


def build(cfg: DictConfig, *, load_data: bool = True):
    """(module, datamodule, method) for a config; data validated before anything heavy."""
    tasks = load_stream(cfg.benchmark, seed=cfg.seed) if load_data else []
    method = build_method(cfg)
    backbone = load_backbone(cfg.backbone.name_or_path, tiny=cfg.backbone.tiny, dtype=cfg.backbone.dtype,
                             cache_dir=cfg.paths.cache_dir)
    names = [t.name for t in tasks] or list(cfg.get("task_names", []))
    module = ContinualLM(
        backbone, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, gates=method.gate_spec,
        optimizer=instantiate(cfg.optimizer), generation={"max_new_tokens": cfg.backbone.max_new_tokens,
                                                           "num_beams": cfg.generation.num_beams},
        task_names=names, task_metrics=[t.metric for t in tasks])
    collator = Collator(backbone.tokenizer, backbone.kind, cfg.backbone.max_source_length,
                        cfg.backbone.max_target_length)
    datamodule = TaskStreamDataModule(tasks, collator, batch_size=cfg.data.batch_size,
                                      eval_batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                                      seed=cfg.seed) if tasks else None
    return module, datamodule, method


def resolve_run_dir(cfg: DictConfig) -> RunDir:
    base = Path(cfg.paths.runs_dir) / cfg.exp_name
    run_id = cfg.run_id
    if run_id is None and cfg.resume:
        unfinished = sorted(p for p in base.glob("*") if (p / "config.yaml").is_file()
                            and '"status": "finished"' not in _read(p / "results.json"))
        if not unfinished:
            raise ConfigError(f"resume=true: no unfinished run under {base}; name one with run_id=...")
        return RunDir(unfinished[-1])
    return RunDir(base / (run_id or datetime.now().strftime("%Y%m%d-%H%M%S")))


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def make_loggers(cfg: DictConfig, run_dir: RunDir) -> list:
    loggers = []
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        loggers.append(instantiate(spec))
    return loggers


def trainer_factory(cfg: DictConfig, run_dir: RunDir, loggers: list):
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)

    def make(task: int, callbacks: list) -> L.Trainer:
        strategy = cfg.strategy
        strategy = instantiate(strategy) if "_target_" in strategy else strategy.name
        return L.Trainer(**trainer_kwargs, strategy=strategy, logger=loggers, callbacks=callbacks,
                         default_root_dir=str(run_dir.root))
    return make


def run(cfg: DictConfig) -> dict:
    run_dir = resolve_run_dir(cfg)
    if run_dir.config.exists() and not cfg.resume:
        raise ConfigError(f"{run_dir.root} already holds a run; pass resume=true or a new run_id")
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir.root)
    module, datamodule, method = build(cfg)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
    loggers = make_loggers(cfg, run_dir)
    info = {"experiment": cfg.exp_name, "method": method.name, "benchmark": cfg.benchmark.name,
            "order": cfg.benchmark.get("order"), "metric": stream_metric(datamodule.tasks), "seed": cfg.seed,
            "selection": cfg.benchmark.get("selection", "carved"), "backbone": module.backbone.name_or_path}
    loop = ContinualLoop(module=module, datamodule=datamodule, method=method, run_dir=run_dir,
                         make_trainer=trainer_factory(cfg, run_dir, loggers), info=info, seed=cfg.seed)
    try:
        results = loop.run()
    finally:
        for logger in loggers:
            logger.finalize("success")
    print(f"AP {results['AP']:.2f}  FT {results['FT']:.2f}  BWT {results['BWT']:.2f}")
    print(run_dir.results)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)["AP"]


if __name__ == "__main__":
    main()
