"""What a run prints while it trains: the task's step bar (n/N optimizer steps, sequence ETA), the
ETA arithmetic, Lightning's per-Trainer chatter kept out, and ``make list``."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from gainlora.progress import (CHATTY_LOGGERS, OTHER_CHATTY, TaskProgressBar, _not_deepspeed_cpu_probe, duration,
                               quiet_lightning, sequence_eta)

ROOT = Path(__file__).resolve().parents[2]


def test_bar_counts_optimizer_steps_of_the_task_across_epochs(capsys) -> None:
    bar = TaskProgressBar("task 2/3 demo_parity", fits_left=1, finished_s=[10.0])
    trainer = L.Trainer(max_steps=6, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    trainer.fit(BoringModel())
    out = capsys.readouterr().out.replace("\r", "\n").splitlines()
    final = [line for line in out if line.startswith("task 2/3 demo_parity")][-1]
    assert "6/6" in final and "step/s" in final  # the task's total, not the epoch's 2 batches
    assert "epoch=2" in final and "sequence ETA" in final
    assert bar.train_progress_bar.total == 6


def test_bar_draws_each_step_once_when_an_epoch_is_one_step(capsys) -> None:
    """A small task (36 rows: one step per epoch) printed every step twice into a log file: once at the
    step, once more when the epoch ended."""
    bar = TaskProgressBar("task 1/1 tiny")
    trainer = L.Trainer(max_steps=4, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[bar])
    trainer.fit(BoringModel())
    lines = capsys.readouterr().out.replace("\r", "\n").splitlines()
    drawn = [m.group(1) for line in lines if (m := re.search(r"\| (\d)/4 \[", line))]
    assert [drawn.count(str(n)) for n in (1, 2, 3)] == [1, 1, 1]  # 4: the last step, then closing the bar


def test_sequence_eta() -> None:
    # 30 s left in this task, then two fits at the mean of the finished ones (10 s and 20 s).
    assert sequence_eta(30.0, 100.0, 2, [10.0, 20.0]) == 60.0
    assert sequence_eta(30.0, 100.0, 2, []) == 230.0  # no finished task yet: this one's projected time
    assert [duration(s) for s in (42, 185, 7620)] == ["42 s", "3 min 05 s", "2 h 07 min"]


@pytest.fixture
def restore_levels():
    names = ["lightning", *CHATTY_LOGGERS, *OTHER_CHATTY]
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("DeepSpeed").removeFilter(_not_deepspeed_cpu_probe)


def test_quiet_lightning_drops_info_lines_unless_asked_for(restore_levels, caplog) -> None:
    caplog.set_level(logging.INFO)  # under pytest Lightning's records reach the root logger
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert any("GPU available" in r.getMessage() for r in caplog.records)  # what a Trainer says unasked
    caplog.clear()
    quiet_lightning()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert all(logging.getLogger(n).level == logging.WARNING for n in CHATTY_LOGGERS)

    for name in CHATTY_LOGGERS:  # hydra.verbose=lightning sets the parent to DEBUG: keep the lines
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.getLogger("lightning").setLevel(logging.DEBUG)
    quiet_lightning()
    assert all(logging.getLogger(n).level == logging.NOTSET for n in CHATTY_LOGGERS)


def test_quiet_lightning_drops_deepspeed_s_cpu_probe_and_rouge_s_tokenizer_line(restore_levels) -> None:
    """The two lines a first CPU run printed from other libraries: DeepSpeed's accelerator probe (its
    logger does not propagate, so it is read through a handler of its own) and absl's INFO line."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    deepspeed_log = logging.getLogger("DeepSpeed")
    deepspeed_log.addHandler(handler)
    try:
        logging.getLogger("absl").setLevel(logging.NOTSET)
        quiet_lightning()
        quiet_lightning()  # once per task's Trainer: still one filter
        deepspeed_log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
                              "to detect it.")
        deepspeed_log.warning("a real DeepSpeed warning")
    finally:
        deepspeed_log.removeHandler(handler)
    assert seen == ["a real DeepSpeed warning"]
    assert deepspeed_log.filters.count(_not_deepspeed_cpu_probe) == 1
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_list_names_every_experiment_and_method() -> None:
    # `list` has no prerequisite: it reads the YAML files and never touches the virtualenv.
    out = subprocess.run(["make", "-s", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert {p.stem for p in (ROOT / "experiments").glob("*.yaml")} <= names
    assert {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")} <= names
    assert "Paper Table 1: T5-Large, SuperNI order 1" in out
