"""Entry point: ``python -m gainlora.run [experiment=NAME] [key=value ...]`` (``make run``).

Checks the whole config (``gainlora.schema``), loads and checks the data, claims the run directory
(``gainlora.rundir``), builds everything (``gainlora.build``), then runs the continual loop and
prints the path of results.json last. A mistake in the input, a non-finite loss or a full disk ends
with one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from gainlora.artifacts import RunDir, write_text
from gainlora.build import (build, check_backbone_source, check_reference_tests, check_trainer, check_val_interval,
                            derive_batching, in_task_checkpoints, make_loggers, single_task_reference, trainer_factory)
from gainlora.callbacks.interrupt import resume_command
from gainlora.cli import check_overrides, disk_full, fail, group_options, preset_note, writable_file
from gainlora.data.tasks import load_stream, stream_metric
from gainlora.data.types import DataError
from gainlora.loop import ArtifactError, ContinualLoop, StopFlag, TaskInterrupted
from gainlora.observers import logger_observers
from gainlora.rundir import claim_run_dir, is_main_process, record_inputs
from gainlora.schema import ConfigError, validate_config
from gainlora.summary import run_summary
from gainlora.wandb_logging import finish as finish_wandb

CONF_DIR = Path(os.environ.get("GAINLORA_CONF", Path(__file__).resolve().parents[2] / "conf"))


def run(cfg: DictConfig) -> dict:
    validate_config(cfg)  # every key, before anything is loaded or written
    derive_batching(cfg)
    check_trainer(cfg)
    tasks = load_stream(cfg.benchmark, seed=cfg.seed)
    check_val_interval(cfg, tasks)
    record_inputs(cfg, tasks)  # a resume refuses other data or code
    single_task = single_task_reference(cfg, [t.name for t in tasks])
    check_reference_tests(cfg, tasks)
    check_backbone_source(cfg.backbone, cfg.paths.cache_dir)
    with claim_run_dir(cfg) as run_dir:  # created, locked and checked: the first write
        module, datamodule, method = build(cfg, tasks)
        if is_main_process() and not cfg.resume:  # a resume keeps the config the run was made with
            write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
        info = {"experiment": str(cfg.exp_name), "method": method.name, "benchmark": cfg.benchmark.name,
                "order": cfg.benchmark.get("order"), "metric": stream_metric(tasks), "seed": cfg.seed,
                "selection": cfg.benchmark.get("selection", "carved"), "backbone": module.backbone.name_or_path,
                "derived": OmegaConf.to_container(cfg.derived),  # world size, per-device and global batch
                "notes": sorted({note for task in tasks for note in task.notes})}  # e.g. selection=paper
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
            signal = "SIGTERM" if isinstance(err, SIGTERMException) else "Ctrl-C"
            reason = str(err) or f"stopped by {signal}; finished tasks are saved"
            print(f"interrupted: {reason}; resume with:\n  {resume_command(run_dir.root.name)}", file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else stop.exit_code)
    except BaseException as err:  # finished tasks stay on disk; say what stopped the run
        loop.finish(f"failed: {type(err).__name__}: {err}"[:500])
        raise
    finally:
        for logger in loggers:
            logger.finalize("success")
        finish_wandb(loggers)
    if loop.is_main:
        print(run_summary(results, run_dir.root))
        print(run_dir.results)
    return results


USER_ERRORS = (ConfigError, DataError, ArtifactError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["AP"]
    except USER_ERRORS as err:  # one clear line, no traceback, for mistakes in the input
        fail(preset_note(str(err), CONF_DIR))
    except FloatingPointError as err:  # the loop has written the failed status to results.json
        fail(f"{Path(cfg.paths.run_dir) / 'results.json'}: {err}")
    except Exception as err:
        full = disk_full(err)
        if full is None:
            raise
        # a copy or rename names its destination second (Lightning saves through a temp file in /tmp)
        where = getattr(full, "filename2", None) or getattr(full, "filename", None) or cfg.paths.run_dir
        fail(f"{where}: no space left on device; finished tasks are kept, free "
             "some space and resume with resume=true")


MULTIRUN = ("-m", "--multirun")


def cli() -> None:
    """``python -m gainlora.run`` / ``gainlora-run``: Hydra's command line, overrides checked first;
    in a multirun, every job's config, so a bad value fails the sweep before its first job trains."""
    args = sys.argv[1:]
    check_hydra_flags(args)
    flags = [arg for arg in args if arg.startswith("-")]
    if not flags:  # plain overrides; Hydra's other flags go to Hydra as they are
        check_overrides(CONF_DIR, args)
        if any(arg.partition("=")[0].lstrip("+") == "hydra.run.dir" for arg in args):
            folder = Path(str(compose_config(args, hydra=True).hydra.run.dir))
            unwritable = None if folder.is_dir() else writable_file(folder / "run")
            if unwritable:  # Hydra makes it before main: a traceback otherwise
                fail(f"hydra.run.dir={folder}: {unwritable}")
    elif set(flags) <= set(MULTIRUN):
        overrides = [arg for arg in args if arg not in MULTIRUN]
        jobs = sweep_jobs(overrides)
        writers: dict[tuple, int] = {}  # run directory named by an explicit run_id -> the job writing it
        for n, job in enumerate(jobs, 1):
            check_overrides(CONF_DIR, job)
            try:
                cfg = compose_config(job)
                validate_config(cfg)
            except ConfigError as err:
                fail(f"{preset_note(str(err), CONF_DIR)} (sweep job {n} of {len(jobs)})")
            if cfg.run_id is not None:
                where = (str(cfg.paths.runs_dir), str(cfg.exp_name), str(cfg.run_id))
                if where in writers:
                    fail(f"run_id={cfg.run_id}: one run directory per sweep job (jobs {writers[where]} and {n} "
                         "would both write it); leave run_id unset or sweep it")
                writers[where] = n
        folder = Path(str(compose_config(jobs[0], hydra=True).hydra.sweep.dir))
        unwritable = writable_file(folder / "multirun.yaml")
        if unwritable:  # Hydra makes it before the first job: a traceback otherwise
            fail(f"hydra.sweep.dir={folder}: {unwritable}")
        sys.argv[1:] = [flags[0], *overrides]  # Hydra takes its flag before the overrides only
    main()


ROOT_FLAGS = ("--config-name", "-cn", "--config-path", "-cp")
DIR_FLAGS = ("--config-dir", "-cd")
MODE_FLAGS = ("-m", "--multirun", "-c", "--cfg", "-i", "--info", "-r", "--run", "-sc", "--shell-completion")


def check_hydra_flags(args: list[str]) -> None:
    """Hydra's flags that choose where configs come from, checked like overrides (Hydra answers a bad
    one with a multi-line error and exit 1): the primary config is conf/config.yaml, whose schema
    every run is validated against; an added search path must be a folder."""
    modes = [arg for arg in args if arg.partition("=")[0] in MODE_FLAGS]
    if len(modes) > 1:  # Hydra raises a ValueError (a traceback) for this
        fail(f"{' and '.join(modes)}: one of --multirun, --cfg, --info, --run, --shell-completion at a time")
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ROOT_FLAGS:
            fail(f"{flag}: not supported; runs compose conf/config.yaml (pick a named experiment with "
                 "experiment=NAME, or add a config folder with --config-dir DIR)")
        if flag in DIR_FLAGS:
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not value or not Path(value).is_dir():
                fail(f"{flag}={value}: not a folder (a config search path added to conf/)")


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands them (the product of the sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error: check_overrides names it as a plain run would
        check_overrides(CONF_DIR, overrides)
        raise
    choices = [[f"{o.get_key_element()}={v}" for v in sweep_values(o)] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


def sweep_values(override) -> list[str]:
    """The values of one sweep as the basic sweeper enumerates them; a glob over a config group's
    options (``method=glob(gainlora_*)``) matches that group's files."""
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    if isinstance(override.value(), Glob):
        options = group_options(CONF_DIR / override.get_key_element())
        values = override.value().filter(options)
        if not values:
            fail(f"{override.input_line}: matches none of {override.get_key_element()}'s options "
                 f"({', '.join(options) or 'none: not a config group'})")
        return values
    try:
        values = list(override.sweep_string_iterator())
    except HydraException as err:  # interval(): a sweeper plugin's (Optuna, Ax), not the basic sweeper's
        fail(f"{override.input_line}: {err}; the basic sweeper takes choices (a,b,c) and range(start,stop)")
    if not values:
        fail(f"{override.input_line}: a sweep of no values (an empty range?)")
    return values


def compose_config(overrides: list[str], hydra: bool = False) -> DictConfig:
    """A job's config as Hydra will launch it, ``${hydra:...}`` interpolations included (a sweep's
    ``run_id=${hydra:runtime.choices.method}-s${seed}``): Hydra's own node is composed and set as
    the current HydraConfig; ``hydra``: keep that node (where a multirun writes its own files),
    otherwise it is left out, as in a launched job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if not hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


if __name__ == "__main__":
    cli()
