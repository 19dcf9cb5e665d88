"""Test-only: the entry point, SIGKILLed at an exact point of a task boundary.

``python tests/support/faults.py POINT TASK key=value ...`` runs ``python -m gainlora.run key=value ...``
and kills itself (SIGKILL: nothing is cleaned up) at POINT of task TASK (0-based):

- ``after_done``: right after the task folder, DONE included, is written (before predictions.json,
  results.json and the task's metrics.csv row);
- ``during_metrics_write``: half-way through writing the metrics.csv that holds the task's CL row.
"""
from __future__ import annotations

import csv
import os
import runpy
import signal
import sys

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
else:
    raise SystemExit(f"unknown fault point {point!r}")

runpy.run_module("gainlora.run", run_name="__main__")
