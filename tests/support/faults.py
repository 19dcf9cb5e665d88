"""Test-only: the entry point, SIGKILLed at an exact point of a task boundary.

``python tests/support/faults.py POINT TASK key=value ...`` runs ``python -m gainlora.run key=value ...``
and kills itself (SIGKILL: nothing is cleaned up) at POINT of task TASK (0-based):

- ``after_done``: right after the task folder, DONE included, is written (before predictions.json,
  results.json and the task's metrics.csv row);
- ``during_metrics_write``: half-way through writing the metrics.csv that holds the task's CL row;
- ``during_task_write``: in the task folder's staging copy, after its branch.safetensors;
- ``during_results_write``: half-way through the results.json written at the task's end.
"""
from __future__ import annotations

import csv
import os
import runpy
import signal
import sys

from gainlora import artifacts
from gainlora.artifacts import RunDir

point, task = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "after_done":
    save_task = RunDir.save_task

    def save_then_die(self, t, *args, **kwargs):
        folder = save_task(self, t, *args, **kwargs)
        if t == task:
            die()
        return folder

    RunDir.save_task = save_then_die
elif point == "during_metrics_write":
    writerows = csv.DictWriter.writerows

    def write_half_then_die(self, rows):
        rows = list(rows)
        if any(str(r.get("cl/task")) == str(task + 1) for r in rows):
            writerows(self, rows[: len(rows) // 2])
            self.writer.writerow(["half a row"])
            die()
        writerows(self, rows)

    csv.DictWriter.writerows = write_half_then_die
elif point in ("during_task_write", "during_results_write"):
    atomic_write = artifacts.atomic_write

    def write_then_die(path, write):
        path = artifacts.Path(path)
        if point == "during_task_write" and path.name == "branch.safetensors" and f"{task + 1:02d}-" in path.parent.name:
            atomic_write(path, write)
            die()
        if point == "during_results_write" and path.name == "results.json":
            def half(tmp):
                write(tmp)
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                die()
            return atomic_write(path, half)
        return atomic_write(path, write)

    artifacts.atomic_write = write_then_die
else:
    raise SystemExit(f"unknown fault point {point!r}")

runpy.run_module("gainlora.run", run_name="__main__")
