"""Build the task stream a config asks for: which tasks, in which order, from which reader."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gainlora.data.types import DataError, TaskData

READERS = ("demo", "superni", "long", "custom")


def task_order(cfg: Mapping) -> list[str]:
    """``cfg.tasks`` if given, else ``cfg.orders[cfg.order]``; cut to ``cfg.num_tasks``."""
    tasks = cfg.get("tasks")
    if tasks is None:
        orders = cfg.get("orders") or {}
        order = cfg.get("order")
        key = next((k for k in orders if str(k) == str(order)), None)
        if key is None:
            raise DataError(f"benchmark.order={order}: one of {', '.join(map(str, orders)) or 'none'} (the orders "
                            f"of benchmark {cfg.get('name')})")
        tasks = orders[key]
    tasks, keep = list(tasks), cfg.get("num_tasks")
    if not tasks or isinstance(cfg.get("tasks"), str):
        raise DataError(f"benchmark.tasks={cfg.get('tasks')!r}: a non-empty list of task names")
    if keep is not None:
        if not 1 <= keep <= len(tasks):  # 0 or -1 would silently mean "all" or "drop the last"
            raise DataError(f"benchmark.num_tasks={keep}: 1 to {len(tasks)} (the tasks available), or null for all")
        tasks = tasks[:keep]
    if len(set(tasks)) != len(tasks):
        twice = next(t for t in tasks if tasks.count(t) > 1)
        raise DataError(f"benchmark.tasks={','.join(tasks)}: each task at most once ({twice} appears twice)")
    return tasks


def data_dir(cfg: Mapping) -> Path:
    found = cfg.get("data_dir") or os.environ.get("GAINLORA_DATA")
    if not found:
        raise DataError("benchmark.data_dir is not set: run `make data` or set GAINLORA_DATA "
                        "to the CL_Benchmark folder")
    return Path(found).expanduser()


def load_stream(cfg: Mapping, seed: int) -> list[TaskData]:
    """Validate every task first (clear errors before any training), then load them all."""
    reader = cfg.get("reader")
    if reader not in READERS:
        raise DataError(f"benchmark.reader: unknown {reader!r}; expected one of {READERS}")
    if reader == "custom":  # tasks name their own files (gainlora.data.custom)
        from gainlora.data.custom import load_custom_stream

        return load_custom_stream(cfg, seed=seed)
    tasks = task_order(cfg)
    if reader == "demo":
        from gainlora.data.demo import make_demo_task

        # The caps (debug=cpu_tiny sets them) bound the generated splits as they bound a real task's.
        train_cap, eval_cap = cfg.get("max_train_per_task"), cfg.get("max_eval_per_task")
        sizes = {"n_train": _capped(cfg.get("n_train", 800), train_cap),
                 "n_val": _capped(cfg.get("n_val", 100), eval_cap), "n_test": _capped(cfg.get("n_test", 200), eval_cap)}
        return [make_demo_task(name, seed=seed, **sizes) for name in tasks]
    from gainlora.data.benchmarks import load_task, validate_tasks

    root, selection, carve = data_dir(cfg), cfg.get("selection", "carved"), dict(cfg.get("carve") or {})
    validate_tasks(root, reader, tasks, selection=selection, carve=carve)
    test_size = {} if cfg.get("carve_test_size") is None else {"carve_test_size": cfg.get("carve_test_size")}
    return [load_task(root, reader, name, seed=seed, max_train=cfg.get("max_train_per_task"),
                      max_eval=cfg.get("max_eval_per_task"), val_size=cfg.get("val_size", 0.1),
                      selection=selection, carve_from=carve.get(name), **test_size) for name in tasks]


def _capped(size: int, cap: int | None) -> int:
    return size if cap is None else min(size, cap)


def stream_metric(tasks: Sequence[TaskData]) -> str:
    metrics = sorted({t.metric for t in tasks})
    return metrics[0] if len(metrics) == 1 else "+".join(metrics)
