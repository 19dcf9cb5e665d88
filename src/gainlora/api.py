"""Load a finished (or partly finished) run back for inference: ``gainlora.load_run(path)``.

Everything comes from the run directory: the resolved config.yaml, checked by the run schema (which
builds only the project's own classes, so a crafted config cannot run code), rebuilds the backbone
and the method, and each finished task's safetensors re-open its branch and gate. Nothing is unpickled.
A single-task reference run loads as its last finished task's branch alone (each task's branch
replaced the previous one); a multi-task run as its one jointly trained branch.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from gainlora.artifacts import ArtifactError, RunDir, read_config
from gainlora.build import build_model, check_backbone_source
from gainlora.data.collate import Collator
from gainlora.loop import fits, restore_task
from gainlora.methods.base import Method
from gainlora.model.module import ContinualLM
from gainlora.predict import Throughput, predict, predict_file
from gainlora.rundir import check_trained_method
from gainlora.schema import ConfigError, validate_config


@dataclass
class TrainedModel:
    module: ContinualLM
    method: Method
    collator: Collator
    config: DictConfig
    tasks: list[str]  # the tasks it has learned, in order

    def generate(self, prompts: list[str], *, batch_size: int = 32, progress: bool = False,
                 **generation) -> list[str]:
        """Answers for already-formatted prompts (see gainlora.data.benchmarks for the templates), in
        their order, generated in batches of similar length as ``make predict`` does; ``progress``:
        a bar on stderr."""
        return predict(self, prompts, batch_size=batch_size, progress=progress, **generation)[0]

    def predict_file(self, input_path: str | Path, output_path: str | Path, *, batch_size: int = 32,
                     prompt: str | None = None, progress: bool = True, **generation) -> Throughput:
        """``make predict`` from Python: each JSONL line of ``input_path`` (``prompt``, or ``input`` and
        ``instruction``, rendered with the run's template or ``prompt``) to ``output_path`` plus
        ``prediction``, in length-bucketed batches; with ``progress``, a bar and then the throughput
        line on stderr. Returns the throughput."""
        stats = predict_file(self, input_path, output_path, batch_size=batch_size, prompt=prompt,
                             progress=progress, **generation)
        if progress:
            print(stats, file=sys.stderr)
        return stats


def read_run(path: str | Path) -> tuple[RunDir, DictConfig, list[str]]:
    """A run directory's folder, config.yaml and task names, read as data; ``ArtifactError`` names
    the file that is missing or not what a run writes (``FileNotFoundError`` when there is no run)."""
    path = Path(path).expanduser()
    run_dir = RunDir(path.parent if path.is_file() else path)
    if not run_dir.config.is_file() or not run_dir.results.is_file():
        raise FileNotFoundError(f"{run_dir.root}: not a run directory (needs config.yaml and results.json)")
    cfg = read_config(run_dir.config)
    try:
        names = json.loads(run_dir.results.read_text()).get("tasks")
    except (ValueError, AttributeError, UnicodeDecodeError):
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ArtifactError(f"{run_dir.results}: not a run's results (no list of task names under 'tasks')")
    return run_dir, cfg, names


def load_run(path: str | Path) -> TrainedModel:
    """``path``: a run directory, or the results.json (any file in it) that a run prints last.

    Raises ``gainlora.schema.ConfigError`` (a ValueError) naming config.yaml and the key when it is
    not a valid run config, e.g. one whose ``_target_`` is not one of the project's classes;
    ``gainlora.artifacts.ArtifactError`` naming a file that is unreadable, altered or does not fit."""
    run_dir, cfg, names = read_run(path)
    try:
        validate_config(cfg, machine=False)  # inference does not need the accelerator it trained on
        check_backbone_source(cfg.backbone, cfg.paths.get("cache_dir"))  # a moved model folder: one line
    except ConfigError as err:
        raise ConfigError(f"{run_dir.config}: {err}") from None
    module, method, collator = build_model(cfg, names)
    check_trained_method(run_dir, method.name)
    method.setup(module, len(names))
    learned = []
    for t, name in fits(method, names):  # a multi-task run has a single, joint fit
        if not run_dir.is_done(t, name):
            break
        files, _ = run_dir.load_task(t, name)
        restore_task(module, method, t, files, run_dir.task_dir(t, name))
        learned = names[: t + 1]
    if not learned:
        raise FileNotFoundError(f"{run_dir.root}: no finished task to load")
    module.start_task(len(learned) - 1)
    module.eval()
    return TrainedModel(module=module, method=method, collator=collator, config=cfg, tasks=learned)
