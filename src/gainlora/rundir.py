"""Which run directory a run writes, and that it is the only writer.

``runs/<exp_name>/<run_id>/``: a fresh run takes a new id (a timestamp by default, created
exclusively: runs started in the same second get ``<stamp>-2``, ``-3``, ...) and refuses a
directory that already holds a run; ``resume=true`` continues a named run, or the most recently
modified unfinished one, after checking that the saved config is safe to read and matches this one.
Rank 0 holds ``<run_dir>/.lock`` (an OS file lock: it goes with the process, so a killed run leaves
nothing to clean) for the whole run and records its holder beside it, so a second process refuses
with a line naming the holder. Worker ranks join the directory rank 0 chose (``GAINLORA_RUN_ID``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from gainlora import __version__
from gainlora.artifacts import ArtifactError, RunDir, read_config, write_json
from gainlora.csv_logger import read_rows
from gainlora.data.types import TaskData
from gainlora.schema import ConfigError, refuse, validate_config
from gainlora.targets import bind_method, make

RUN_ID_ENV = "GAINLORA_RUN_ID"
CODE_DIR = Path(__file__).resolve().parents[1]  # src/ (or site-packages): what Python imports from
LOCK, HOLDER = ".lock", ".lock.json"
# Keys that may differ between an interrupted run and its resumption.
RESUMABLE_KEYS = {"resume", "run_id", "paths", "logger", "trainer.enable_progress_bar", "derived", "checkpoint",
                  "backbone.gradient_checkpointing"}  # memory only: the same loss and gradients


def record_inputs(cfg: DictConfig, tasks: list[TaskData]) -> None:
    """Put what the config alone does not pin down in ``derived`` (saved in config.yaml): a sha256 of
    each task's examples (a custom task's files can change under the same path) and the code version,
    which a resume must find unchanged (:func:`check_existing`)."""
    with open_dict(cfg):
        cfg.derived.data_sha256 = {task.name: task_digest(task) for task in tasks}
        cfg.derived.code_version = __version__


def task_digest(task: TaskData) -> str:
    digest = hashlib.sha256(task.metric.encode())
    for split in (task.train, task.val, task.test):
        digest.update(json.dumps([[e.source, e.target, list(e.references), e.id] for e in split]).encode())
    return digest.hexdigest()


def is_main_process() -> bool:
    """Global rank 0. Ranks launched by Lightning re-run the entry point with their rank in the env."""
    return rank_zero_only.rank == 0


def status(root: Path) -> str | None:
    return RunDir(root).saved("status")


def last_modified(root: Path) -> float:
    """Newest mtime of the directory and what it holds one level down (tasks/, results.json, ...)."""
    return max((p.stat().st_mtime for p in [root, *root.iterdir()]), default=0.0)


def latest_unfinished(base: Path) -> Path | None:
    runs = [p for p in base.glob("*") if (p / "config.yaml").is_file() and status(p) != "finished"]
    return max(runs, key=last_modified, default=None)


def resolve_run_dir(cfg: DictConfig) -> RunDir:
    # ~ expanded: GAINLORA_RUNS='~/runs' made a folder named '~' in the working directory
    base = Path(cfg.paths.runs_dir).expanduser() / str(cfg.exp_name)  # exp_name=123 is a name too
    if cfg.run_id is not None:
        return RunDir(base / str(cfg.run_id))
    if cfg.resume:
        found = latest_unfinished(base)
        if found is None:
            raise refuse("resume", True, f"needs an unfinished run under {base} (none there); name one with run_id=...")
        print(f"[gainlora] resuming {found} (the most recently modified unfinished run)", flush=True)
        return RunDir(found)
    return RunDir(base / datetime.now().strftime("%Y%m%d-%H%M%S"))  # made unique by claim_run_dir


def make_fresh(root: Path) -> Path:
    """Create a generated run directory exclusively: ``<stamp>``, else ``<stamp>-2``, ``-3``, ... Two
    runs started in the same second (a multirun, two shells) each get their own; a check for an
    existing folder before creating it let both take one."""
    stamp, n = root.name, 1
    while True:
        try:
            root.mkdir()
            return root
        except FileExistsError:
            n += 1
            root = root.with_name(f"{stamp}-{n}")


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


class RunLock:
    """``<run_dir>/.lock`` held for the run's lifetime, its holder (pid, host, start) in ``.lock.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = FileLock(root / LOCK)

    def acquire(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                if not (self.root / HOLDER).is_file():
                    raise OSError("not a file")
                who = json.loads((self.root / HOLDER).read_text())
                holder = f"pid {who['pid']} on host {who['host']} since {who['since']}"
            except (OSError, ValueError, KeyError):
                holder = "another process"
            raise ConfigError(f"{self.root}: in use by {holder}; wait for it to end or use another run_id") from None
        write_json(self.root / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / HOLDER).unlink()
        self.lock.release()


@contextlib.contextmanager
def claim_run_dir(cfg: DictConfig) -> Iterator[RunDir]:
    """The run's directory, created and locked (rank 0), checked against what it already holds.

    Fails, with nothing left behind, when the directory cannot be written, is in use, holds another
    run (without resume=true), lost its config.yaml but holds tasks, or was made with another config.
    """
    if not is_main_process():  # a DDP/DeepSpeed worker: join the directory rank 0 made
        with open_dict(cfg):
            cfg.run_id = cfg.run_id or os.environ[RUN_ID_ENV]
            cfg.paths.run_dir = str(resolve_run_dir(cfg).root)
        yield RunDir(cfg.paths.run_dir)
        return
    run_dir = resolve_run_dir(cfg)
    root = run_dir.root
    check_runs_dir(cfg.paths.runs_dir, root)
    if cfg.resume and not run_dir.config.is_file():
        raise refuse("run_id", root.name, f"resume=true needs an existing run; {root} holds none")
    if root.exists() and not root.is_dir():
        raise refuse("run_id", root.name, f"a new name: {root} is a file, not a run directory")
    created = [p for p in root.parents if not p.exists()]  # new parents, and the run dir if made here
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        if cfg.run_id is None and not cfg.resume:  # a generated id: a folder of its own
            run_dir = RunDir(root := make_fresh(root))
            created.insert(0, root)
        else:
            try:
                root.mkdir()
                created.insert(0, root)
            except FileExistsError:  # the run to resume, or another process's: the lock and checks decide
                pass
    except OSError as err:
        raise refuse("paths.runs_dir", cfg.paths.runs_dir, f"a writable directory ({err.strerror}: "
                     f"{err.filename or root})") from None
    if (root / LOCK).exists() and not (root / LOCK).is_file():  # not the writable-folder problem it raises
        raise ArtifactError(f"{root / LOCK}: not a file; move it away (it is the run's lock, made again)")
    lock = RunLock(root)
    try:
        lock.acquire()
    except OSError as err:
        raise refuse("paths.runs_dir", cfg.paths.runs_dir,
                     f"a writable directory ({err.strerror}: {err.filename or root})") from None
    try:
        check_existing(cfg, run_dir)
        os.environ[RUN_ID_ENV] = root.name  # inherited by the worker processes Lightning launches
        with open_dict(cfg):
            cfg.paths.run_dir = str(root)
            cfg.run_id = root.name
        yield run_dir
    finally:
        lock.release()
        if created and not run_dir.config.exists():  # nothing of a run was written: leave no trace
            with contextlib.suppress(OSError):
                (root / LOCK).unlink()
                for folder in created:
                    folder.rmdir()


def check_runs_dir(runs_dir: str, root: Path) -> None:
    """Runs go to a folder of their own: not the filesystem root, not among the code Python imports."""
    where = root.resolve()
    if Path(runs_dir).expanduser().resolve() == Path(where.anchor):
        raise refuse("paths.runs_dir", runs_dir, "a folder for runs, not the filesystem root")
    if where.is_relative_to(CODE_DIR):
        raise refuse("paths.runs_dir", runs_dir, f"a folder outside {CODE_DIR}, where Python imports the code from")


def check_trained_method(run_dir: RunDir, method: str) -> None:
    """The method a config builds must be the one results.json says trained the saved tasks (an
    edited config.yaml would otherwise load one method's branches into another)."""
    trained = run_dir.saved("method")  # None before any results (killed in its first task): nothing to mismatch
    if trained is not None and trained != method:
        raise ConfigError(f"{run_dir.config}: its method builds {method}, but {run_dir.results} says the run "
                          f"trained {trained}; restore the config the run was made with")


def check_existing(cfg: DictConfig, run_dir: RunDir) -> None:
    root = run_dir.root
    if not run_dir.config.is_file():
        if (root / "tasks").exists():
            raise refuse("run_id", root.name, f"a new name: {root} holds tasks but no config.yaml, so what made "
                         "them is unknown; it is never reused")
        others = sorted(p.name for p in root.iterdir() if p.name not in (LOCK, HOLDER))
        if others:  # not a run's folder (a run writes config.yaml before anything else but the lock)
            raise refuse("run_id", root.name, f"a new name: {root} holds other files ({', '.join(others[:3])}), "
                         "not a run; a run writes a new or empty folder")
        return
    if not cfg.resume:
        raise refuse("run_id", root.name, f"a new name: {root} already holds a run (or pass resume=true)")
    try:
        saved = read_config(run_dir.config)  # data only: no aliases or interpolations to expand
    except ArtifactError as err:
        raise ConfigError(str(err)) from None
    try:
        method = validate_config(saved, machine=False).method  # a saved config naming foreign code is refused here
    except ConfigError as err:
        raise ConfigError(f"{run_dir.config}: {err}") from None
    check_trained_method(run_dir, make(bind_method("method", method)).name)
    for path, kind in ((run_dir.results, "file"), (run_dir.predictions, "file"), (run_dir.plots, "folder")):
        if path.exists() and not (path.is_file() if kind == "file" else path.is_dir()):  # rewritten on resume
            raise ArtifactError(f"{path}: not a {kind}; move it away to resume (it is written again from the "
                                "finished tasks)")
    for folder in (root / "tasks", root / "checkpoints"):  # written into: a link would send writes elsewhere
        if folder.is_symlink():
            raise ArtifactError(f"{folder}: a link, not this run's own folder; a resume would write where it points")
    read_rows(root / "metrics.csv")  # appended to: a damaged one is named now, not after the restore
    diffs = config_differences(saved, cfg)
    if diffs:
        raise ConfigError(f"resume: {run_dir.config} was made with another config; differing keys: "
                          + "; ".join(diffs[:5]))
    before, now = saved.get("derived") or {}, cfg.get("derived") or {}
    if before.get("code_version") not in (None, now.get("code_version")):
        raise refuse("resume", True, f"the gainlora version that made {root} ({before.code_version}); this is "
                     f"{now.get('code_version')}: start a new run")
    for task, digest in (before.get("data_sha256") or {}).items():
        if digest != (now.get("data_sha256") or {}).get(task, digest):
            raise refuse("resume", True, f"the data {root} was trained on; task {task}'s examples changed since "
                         f"(sha256 {digest[:12]} -> {now.data_sha256[task][:12]}): restore them or start a new run")
