"""Entry point: ``python -m gainlora.run [experiment=NAME] [key=value ...]`` (``make run``).

Checks the whole config (``gainlora.schema``), loads and checks the data, claims the run directory
(``gainlora.rundir``), builds everything (``gainlora.build``), then runs the continual loop and
prints the path of results.json last. A mistake in the input, a non-finite loss or a full disk ends
with one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gainlora.artifacts import RunDir, write_text
from gainlora.build import (build, check_backbone_source, check_trainer, derive_batching, in_task_checkpoints,
                            make_loggers, single_task_reference, trainer_factory)
from gainlora.callbacks.interrupt import resume_command
from gainlora.data.tasks import load_stream, stream_metric
from gainlora.data.types import DataError
from gainlora.loop import ArtifactError, ContinualLoop, StopFlag, TaskInterrupted
from gainlora.observers import logger_observers
from gainlora.rundir import claim_run_dir, is_main_process
from gainlora.schema import ConfigError, validate_config

CONF_DIR = Path(os.environ.get("GAINLORA_CONF", Path(__file__).resolve().parents[2] / "conf"))


def run(cfg: DictConfig) -> dict:
    validate_config(cfg)  # every key, before anything is loaded or written
    derive_batching(cfg)
    check_trainer(cfg)
    tasks = load_stream(cfg.benchmark, seed=cfg.seed)
    single_task = single_task_reference(cfg, [t.name for t in tasks])
    check_backbone_source(cfg.backbone)
    with claim_run_dir(cfg) as run_dir:  # created, locked and checked: the first write
        module, datamodule, method = build(cfg, tasks)
        if is_main_process():
            write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
        info = {"experiment": cfg.exp_name, "method": method.name, "benchmark": cfg.benchmark.name,
                "order": cfg.benchmark.get("order"), "metric": stream_metric(tasks), "seed": cfg.seed,
                "selection": cfg.benchmark.get("selection", "carved"), "backbone": module.backbone.name_or_path,
                "derived": OmegaConf.to_container(cfg.derived)}  # world size, per-device and global batch
        if single_task is not None:
            info["single_task_run"] = str(cfg.metrics.single_task_run)
        loggers = make_loggers(cfg)
        stop = StopFlag()
        stop.install()
        loop = ContinualLoop(module=module, datamodule=datamodule, method=method, run_dir=run_dir,
                             make_trainer=trainer_factory(cfg, run_dir, loggers), info=info, seed=cfg.seed,
                             progress_bar=cfg.trainer.enable_progress_bar, observers=logger_observers(loggers),
                             is_main=is_main_process(), stop=stop, single_task=single_task,
                             checkpoint=in_task_checkpoints(cfg))
        return run_loop(loop, run_dir, loggers, stop)


def run_loop(loop: ContinualLoop, run_dir: RunDir, loggers: list, stop: StopFlag) -> dict:
    try:
        results = loop.run()
    except (TaskInterrupted, KeyboardInterrupt, SIGTERMException) as err:  # SIGTERM, Ctrl-C
        # Lightning's SIGTERMException (raised when SIGTERM lands in an evaluation or between its
        # checks) is a SystemExit with no code: left alone, a killed run would exit 0 as "failed".
        loop.finish("interrupted")
        if loop.is_main:
            print(f"interrupted: {str(err) or type(err).__name__}; resume with:\n  {resume_command(run_dir.root.name)}",
                  file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else stop.exit_code)
    except BaseException as err:  # finished tasks stay on disk; say what stopped the run
        loop.finish(f"failed: {type(err).__name__}: {err}"[:500])
        raise
    finally:
        for logger in loggers:
            logger.finalize("success")
    if loop.is_main:
        print("  ".join(f"{k} {results[k]:.2f}" for k in ("AP", "FT", "BWT", "FWT") if results[k] is not None))
        print(run_dir.results)
    return results


USER_ERRORS = (ConfigError, DataError, ArtifactError)


def disk_full(err: BaseException) -> BaseException | None:
    """The ENOSPC error behind ``err``, if any. Libraries wrap I/O errors in their own, some only
    in text (safetensors: "I/O error: No space left on device (os error 28)")."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["AP"]
    except USER_ERRORS as err:  # one clear line, no traceback, for mistakes in the input
        fail(str(err))
    except FloatingPointError as err:  # the loop has written the failed status to results.json
        fail(f"{Path(cfg.paths.run_dir) / 'results.json'}: {err}")
    except Exception as err:
        full = disk_full(err)
        if full is None:
            raise
        fail(f"{getattr(full, 'filename', None) or cfg.paths.run_dir}: no space left on device; finished tasks are kept, free "
             "some space and resume with resume=true")


def check_overrides(overrides: list[str]) -> None:
    """Hydra reports a bad override (a typo'd key, an unknown group option) in several lines and
    exits 1 before ``main`` runs; compose first, so it is one ``error:`` line and exit 2 as well."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if any(line.startswith("Available options") for line in lines):  # an unknown group option
            start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
            options = [o for o in lines[start:] if not o.startswith(("Config search path", "provider="))]
            fail(f"{lines[0].removeprefix(chr(39).join(['In ', 'config', ': ']))}; available: {', '.join(options)}")
        key = lines[0].partition("Could not override '")[2].rstrip("'.")
        arg = next((a for a in overrides if key and a.split("=")[0].lstrip("+~") == key), None)
        if arg is not None:  # a key the config does not have
            fail(f"{arg}: unknown key (a typo?); to add a new key use +{arg}")
        fail("; ".join(lines[:2]))


def cli() -> None:
    """``python -m gainlora.run`` / ``gainlora-run``: Hydra's command line, overrides checked first."""
    args = sys.argv[1:]
    if not any(arg.startswith("-") for arg in args):  # plain overrides; Hydra's flags go to Hydra as they are
        check_overrides(args)
    main()


if __name__ == "__main__":
    cli()
