"""SIGTERM and Ctrl-C (SIGINT) stop a run at the next batch: the task in progress is not marked
done, finished tasks stay on disk, results.json says "interrupted", and the exact resume command is
printed. A second Ctrl-C stops at once, the same way (not with KeyboardInterrupt: Lightning turns
that into ``sys.exit(1)``)."""
from __future__ import annotations

import shlex
import signal
import sys

import lightning as L


class TaskInterrupted(RuntimeError):
    """A stop signal arrived during a task: it is not marked done, so a resume redoes it."""


class StopFlag:
    """Set by SIGTERM or SIGINT. Lightning's own SIGTERM handler calls ours too and ends fit()."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)  # 130 for Ctrl-C, 143 for SIGTERM (shell convention)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:  # pressed twice: stop now
            raise TaskInterrupted("Ctrl-C pressed twice: stopped at once; the task in progress is not saved")
        self.signal = signum


class StopOnSignal(L.Callback):
    """Ends fit() at the next batch once the flag is set (Lightning handles SIGTERM itself, not SIGINT)."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # Every rank stops at the same batch (Lightning does not sync should_stop, and a rank that
        # stopped alone would leave the others waiting in the gradient all-reduce).
        if trainer.strategy.reduce_boolean_decision(self.flag.requested, all=False):
            trainer.should_stop = True


def resume_command(run_id: str, argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same overrides plus resume=true run_id=<id>."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("resume=", "run_id=", "+resume=", "+run_id="))]
    return shlex.join(["python", "-m", "gainlora.run", *args, "resume=true",
                       f"run_id={run_id}"])
