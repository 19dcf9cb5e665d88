"""Weights & Biases logging for a whole continual run (``logger=wandb``).

One W&B run covers the whole task sequence. Lightning makes a fresh Trainer per task, so its
``trainer/global_step`` restarts at every task; the continual-learning metrics are therefore logged
against their own step metric, ``cl/task`` (the number of tasks learned), declared with
``define_metric``, and never against a step that could decrease.

Without an API key the run is written offline (``wandb sync <dir>`` uploads it later); asked to
log online (WANDB_MODE=online) without credentials, the run stops before training with one
``error:`` line. Only the key's presence is checked here; it is never read, stored or printed (W&B
takes it from its environment or login).
"""
from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from gainlora.artifacts import write_text
from gainlora.run_kinds import run_kind

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
STEP = "cl/task"
_DEFINED: dict[str, set[str]] = {}  # run id -> keys already tied to cl/task


# -- the logger --------------------------------------------------------------------------------------
def should_run_offline(offline: bool | None = None) -> bool:
    """``offline`` when given; else offline unless WANDB_MODE is set or WANDB_API_KEY exists."""
    if offline is not None:
        return offline
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] in ("offline", "dryrun")
    return not os.environ.get("WANDB_API_KEY")


def stable_run_id(run_dir: str | os.PathLike[str]) -> str:
    """The W&B id of the run kept in ``run_dir``: the same id every time, so a resumed run continues.

    Read from ``run_dir/wandb_id.txt`` when present (so a moved run directory keeps its id); otherwise
    a sweep agent's WANDB_RUN_ID, or a hash of the absolute path, written to that file.
    """
    root = Path(run_dir)
    stored = root / ID_FILE
    if stored.is_file() and stored.read_text().strip():
        return stored.read_text().strip()
    run_id = os.environ.get("WANDB_RUN_ID") or "gl-" + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    write_text(stored, run_id + "\n")
    return run_id


def method_label(spec: Mapping | str | None) -> str | None:
    """A short method name from its config: ``name``, else the class (+ branch class): gainlora_inflora."""
    if spec is None or isinstance(spec, str):
        return spec
    if spec.get("name"):
        return str(spec["name"])
    target = spec.get("_target_")
    if not target:
        return None
    label = str(target).rsplit(".", 1)[-1].lower()
    branches = spec.get("branches")
    return f"{label}_{method_label(branches)}" if isinstance(branches, Mapping) else label


def _plain(value: Any) -> Any:
    """Hydra passes nested nodes as OmegaConf containers when not recursing."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def has_credentials() -> bool:
    """Whether wandb will find credentials without prompting: WANDB_API_KEY (or an identity token
    file) in the environment, or a netrc entry for the W&B host (what ``wandb login`` writes; the
    same files wandb reads: $NETRC, else ~/.netrc or ~/_netrc). Only presence is checked."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in (Path(p).expanduser() for p in candidates):
        try:
            if path.is_file() and netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def check(key: str, kwargs: Mapping[str, Any]) -> None:
    """What wandb refused only when the first task's logger started (a traceback after the run directory
    was written), checked by wandb's own Settings: WANDB_MODE, the project, the run id, each tag (the
    job type is one). Online logging asked for (WANDB_MODE=online, or ``offline: false``) without
    credentials is refused too: wandb would stop at its login prompt (no terminal: a traceback) once
    the first task had trained; falling back to offline would hide that the dashboard stays empty."""
    import wandb
    from pydantic import ValidationError

    from gainlora.targets import refuse

    given = [("WANDB_MODE", "mode", os.environ.get("WANDB_MODE") or None),
             (f"{key}.project", "project", kwargs.get("project")), (f"{key}.run_id", "run_id", kwargs.get("run_id")),
             *((f"{key}.tags", "run_tags", (tag,)) for tag in kwargs.get("tags") or ()),
             (f"{key}.job_type", "run_tags", (kwargs["job_type"],) if kwargs.get("job_type") else None)]
    for name, field, value in given:
        if value is None:
            continue
        try:
            wandb.Settings(**{field: value})
        except ValidationError as err:
            raise refuse(name, value[0] if field == "run_tags" else value,
                         err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        except wandb.errors.UsageError as err:
            raise refuse(name, value, str(err)) from None
    disabled = os.environ.get("WANDB_MODE") == "disabled"  # wandb logs nothing: no credentials needed
    if not should_run_offline(kwargs.get("offline")) and not disabled and not has_credentials():
        mode = os.environ.get("WANDB_MODE")
        name, value = ("WANDB_MODE", mode) if kwargs.get("offline") is None else (f"{key}.offline", False)
        raise refuse(name, value, "online logging needs W&B credentials (WANDB_API_KEY, or `wandb login` once); "
                     "none found here. Unset WANDB_MODE (or set WANDB_MODE=offline) to log offline and `wandb "
                     "sync` the run later")


def finish(loggers: Iterable[Logger]) -> None:
    """End the W&B run a continual run logged to: Lightning's finalize leaves it open, and the next
    job of a multirun (same process) then logged into it instead of its own."""
    if _wandb_loggers(loggers):
        import wandb

        if wandb.run is not None:
            wandb.run.finish()


def make_wandb_logger(project: str = "gainlora", entity: str | None = None, group: str | None = None,
                      job_type: str | None = None, tags: Sequence[str] = (), save_dir: str | os.PathLike[str] = ".",
                      run_id: str | None = None, offline: bool | None = None, *, name: str | None = None,
                      method: Mapping | str | None = None, log_model: bool = False) -> WandbLogger:
    """A WandbLogger for one continual run kept in ``save_dir`` (the run directory).

    ``job_type`` defaults to the method's label (``method``: its config node or a name); tags are
    de-duplicated. When ``save_dir/config.yaml`` exists (run.py writes it before making loggers),
    the resolved run config becomes the W&B config.
    """
    save_dir = Path(save_dir)
    offline = should_run_offline(offline)
    run_id = run_id or stable_run_id(save_dir)
    job_type = job_type or method_label(_plain(method))
    tags = list(dict.fromkeys(str(t) for t in [*(_plain(tags) or ()), job_type] if t))
    config_file = save_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
    if offline:
        log.info("W&B runs offline (set WANDB_API_KEY or WANDB_MODE=online to sync live); the run is kept "
                 "in %s/wandb, `wandb sync <that folder>/offline-run-*` uploads it", save_dir)
    return WandbLogger(project=project, entity=entity, group=group, job_type=job_type, tags=tags,
                       save_dir=str(save_dir), id=run_id, name=name or f"{job_type or 'run'}-{save_dir.name}",
                       offline=offline, resume="allow", log_model=log_model, config=config)


# -- continual-learning metrics ----------------------------------------------------------------------
def _wandb_loggers(logger: Logger | Iterable[Logger] | None) -> list[WandbLogger]:
    if logger is None:
        return []
    loggers = [logger] if isinstance(logger, Logger) else list(logger)
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _define_metrics(run: Any, keys: Iterable[str]) -> None:
    """Tie every cl/* key to cl/task, once per run and key.

    Lightning's WandbLogger already maps the glob "*" to trainer/global_step; a glob "cl/*" alone
    would compete with it, so each key is also named explicitly (an exact name beats any glob).
    """
    defined = _DEFINED.get(run.id)
    if defined is None:
        run.define_metric(STEP)
        run.define_metric("cl/*", step_metric=STEP)
        defined = _DEFINED[run.id] = set()
    for key in keys:
        if key != STEP and key not in defined:
            run.define_metric(key, step_metric=STEP)
            defined.add(key)


def _matrix_rows(results: Mapping, upto: int) -> list[list[float | None]]:
    """Rows 0..upto of the accuracy matrix, each cut to the tasks learned at that point."""
    return [list(row[: i + 1]) for i, row in enumerate(results["matrix"][: upto + 1])]


def sample_predictions(predictions: Sequence[Mapping], tasks: Sequence[str], limit: int) -> list[list]:
    """Up to ``limit`` rows (task, source, prediction, references), taken round-robin across tasks."""
    by_task: dict[int, list[Mapping]] = {}
    for p in predictions:
        by_task.setdefault(int(p["task"]), []).append(p)
    rows: list[list] = []
    depth = 0
    while len(rows) < limit and any(depth < len(v) for v in by_task.values()):
        for task in sorted(by_task):
            if depth < len(by_task[task]) and len(rows) < limit:
                p = by_task[task][depth]
                name = tasks[task] if task < len(tasks) else str(task)
                rows.append([name, p.get("source", ""), p["prediction"], " | ".join(p.get("references", []))])
        depth += 1
    return rows


def task_end_payload(task_index: int, results: Mapping, run_dir: Path | None = None,
                     predictions: Sequence[Mapping] | None = None, max_samples: int = 24) -> dict[str, Any]:
    """What :func:`log_task_end` logs after task ``task_index`` (0-based), as one W&B log call."""
    import wandb

    tasks = list(results["tasks"])
    kind = run_kind(results.get("run_kind"))
    joint = kind.joint  # one joint fit: a single row that scores every task
    rows = [list(results["matrix"][0])] if joint else _matrix_rows(results, task_index)
    seen = tasks[: task_index + 1]
    payload: dict[str, Any] = {STEP: task_index + 1}
    for key in ("AP", "FT", "BWT", "BWT_ref", "FWT", "FWT_diag"):
        if results.get(key) is not None:
            payload[f"cl/{key}"] = results[key]
    for j, name in enumerate(seen):  # every seen task's score now: one curve per task over cl/task
        if rows[-1][j] is not None:
            payload[f"cl/score/{name}"] = rows[-1][j]

    payload["cl/matrix"] = wandb.Table(columns=["after_task", *seen],
                                       data=[["all (joint)" if joint else tasks[i],
                                              *(row + [None] * (len(seen) - len(row)))]
                                             for i, row in enumerate(rows)])
    if kind.forgetting:  # a reference run's off-diagonal entries are no forgetting
        # Forgetting curves: task j's score after each task k >= j (x = number of tasks learned).
        xs = [list(range(j + 1, task_index + 2)) for j in range(len(seen))]
        ys = [[rows[k][j] for k in range(j, task_index + 1)] for j in range(len(seen))]
        payload["cl/forgetting"] = wandb.plot.line_series(xs=xs, ys=ys, keys=seen, title="Score per task",
                                                          xname="tasks learned")
    if run_dir is not None:
        for key, image in (("cl/matrix_heatmap", "matrix.png"), ("cl/forgetting_plot", "forgetting.png"),
                           ("cl/scores_plot", "scores.png")):
            path = run_dir / "plots" / image
            if path.is_file():
                payload[key] = wandb.Image(str(path))
        if predictions is None and (run_dir / "predictions.json").is_file():
            predictions = json.loads((run_dir / "predictions.json").read_text())
    if predictions:
        payload["cl/predictions"] = wandb.Table(columns=["task", "source", "prediction", "references"],
                                                data=sample_predictions(predictions, tasks, max_samples))
    return payload


def log_task_end(logger: Logger | Iterable[Logger] | None, task_index: int, results: Mapping, *,
                 run_dir: str | os.PathLike[str] | None = None, predictions: Sequence[Mapping] | None = None,
                 max_samples: int = 24) -> bool:
    """Log the continual metrics after task ``task_index`` (0-based) to every W&B logger given.

    ``results`` is the loop's results dict (tasks, matrix, AP, FT, BWT, ...). Plots and sample
    predictions come from ``run_dir`` (default: the logger's save_dir, i.e. the run directory):
    ``plots/matrix.png``, ``plots/forgetting.png``, ``predictions.json``. Other loggers are ignored,
    so this can be called with the run's whole logger list. Returns whether anything was logged.
    """
    if rank_zero_only.rank != 0:  # other DDP/DeepSpeed ranks hold a no-op experiment
        return False
    loggers = _wandb_loggers(logger)
    for wb in loggers:
        run = wb.experiment
        where = Path(run_dir) if run_dir is not None else (Path(wb.save_dir) if wb.save_dir else None)
        payload = task_end_payload(task_index, results, where, predictions, max_samples)
        _define_metrics(run, payload)
        run.log(payload)  # no step=: W&B's own step only grows, and cl/* use cl/task
        for key in ("AP", "FT", "BWT"):  # final numbers on the run page and for sweeps
            if results.get(key) is not None:
                run.summary[key] = results[key]
    return bool(loggers)
