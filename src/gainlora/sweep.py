"""The summary of a Hydra multirun (``python -m gainlora.run -m key=a,b ...``): a Hydra callback
(``hydra.callbacks`` in conf/config.yaml) that notes each job's run directory as it ends and, when
the sweep ends, writes ``compare.md`` / ``compare.png`` (``make report``'s table and figure, runs
labelled by the settings that differ) into the sweep's folder, ``runs/multirun/<time>/``, next to
Hydra's ``multirun.yaml``, and prints the table.

Jobs are noted in ``jobs.jsonl`` in that folder, one line appended per job in a single write (an
O_APPEND write does not interleave with another), so launchers that run jobs in other processes
are covered as well.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

JOBS = "jobs.jsonl"


def sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir))


def noted_jobs(folder: Path) -> list[dict[str, Any]]:
    path = folder / JOBS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class SweepTable(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # Hydra calls this for a single run too
            return
        run_dir = job_return.cfg.get("paths", {}).get("run_dir") if job_return.cfg is not None else None
        if run_dir is None:  # the job stopped before it had a run directory
            return
        folder = sweep_dir(config)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"job": config.hydra.job.num, "overrides": list(job_return.overrides or []),
                           "run_dir": str(run_dir), "completed": job_return.status == JobStatus.COMPLETED})
        with open(folder / JOBS, "a") as file:
            file.write(line + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gainlora.report import ReportError, compare_runs

        folder = sweep_dir(config)
        jobs = sorted(noted_jobs(folder), key=lambda job: job["job"])
        runs = [Path(job["run_dir"]) for job in jobs if (Path(job["run_dir"]) / "results.json").is_file()]
        if not runs:
            return
        try:
            figure, table = compare_runs(runs, folder)
        except ReportError as err:  # a job's results.json unreadable: say so, the runs stay as they are
            print(f"sweep summary not written: {err}", file=sys.stderr)
            return
        print(f"\n== sweep of {len(runs)} runs ({folder})\n{table.read_text()}figure: {figure}\ntable: {table}")
