"""What a run prints while it trains: one step bar per task with totals and ETAs, the end-of-task
line, and Lightning's per-Trainer chatter kept out.

Every task gets a fresh Trainer (docs/architecture.md), and each Trainer would print its accelerator
banner, a product tip and a deprecation line; those are Lightning INFO records and one torch
FutureWarning. :func:`quiet_lightning` lowers the level of the loggers that emit them (Lightning's
own logging knob), so warnings and errors still show; ``hydra.verbose=lightning`` brings the INFO
lines back. Two lines from other libraries go too: DeepSpeed's "Setting accelerator to CPU" warning
(printed when building a tiny backbone imports it through ``save_pretrained``; a CPU run never uses
DeepSpeed) and rouge_score's "Using default tokenizer." (an INFO record of the ``absl`` logger).
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

# Loggers of Lightning's per-Trainer INFO lines: "GPU available ...", "TPU available ...", the
# "💡 Tip" adverts, "`Trainer.fit` stopped: ..." (rank_zero_info) and "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES".
CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.pytorch.accelerators.cuda")
OTHER_CHATTY = ("absl",)  # rouge_score's "Using default tokenizer." at each scorer it makes


def _not_deepspeed_cpu_probe(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU.")


def quiet_lightning() -> None:
    """Drop Lightning's per-Trainer INFO lines unless the user asked for them (``hydra.verbose``
    naming ``lightning`` or one of the loggers sets them to DEBUG)."""
    for name in (*CHATTY_LOGGERS, *OTHER_CHATTY):
        logger = logging.getLogger(name)
        parents = [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]
        if not any(logging.getLogger(p).level == logging.DEBUG for p in parents):
            logger.setLevel(logging.WARNING)
    # DeepSpeed sets its logger's level when imported, so a filter (which stays) rather than a level;
    # addFilter keeps one copy of the same function.
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_probe)
    # Lightning 2.6 flattens outputs with torch's deprecated LeafSpec: one FutureWarning per task
    # that names Lightning's code, nothing a user of this project can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # Tasks are step-based (max_epochs=-1): Lightning counts the logging interval over the steps of the
    # whole fit, across epochs, so a short epoch loses no log line and its per-task warning is noise.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the "
                            "logging interval")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def sequence_eta(task_left_s: float, task_s: float, fits_left: int, finished_s: list[float]) -> float:
    """Seconds until the sequence ends: what is left of this task, then each remaining fit at the
    mean time of the tasks finished in this process (this task's projected time before any)."""
    per_task = sum(finished_s) / len(finished_s) if finished_s else task_s
    return task_left_s + fits_left * per_task


class TaskProgressBar(TQDMProgressBar):
    """One bar per task counting optimizer steps n/N (not batches of an epoch), with the epoch, the
    loss and the ETA of the whole sequence; evaluation bars vanish when done.

    ``fits_left``: fits after this one; ``finished_s``: wall times of the tasks finished in this
    process (the loop's), for the sequence ETA.
    """

    def __init__(self, label: str, fits_left: int = 0, finished_s: list[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label, self.fits_left, self.finished_s = label, fits_left, finished_s if finished_s is not None else []
        self.started, self.first_step = 0.0, 0

    def init_train_tqdm(self) -> Tqdm:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def init_validation_tqdm(self) -> Tqdm:
        bar = super().init_validation_tqdm()
        bar.leave = False
        return bar

    def init_test_tqdm(self) -> Tqdm:
        bar = super().init_test_tqdm()
        bar.leave = False  # the loop prints the scores
        return bar

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        self.started, self.first_step = time.monotonic(), trainer.global_step  # a resumed task starts > 0
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        bar.n = bar.initial = trainer.global_step
        bar.set_description(self.label)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole task: no reset per epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.postfix(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:  # the next step or the bar's close draws it: one line per step
            self.train_progress_bar.set_postfix(self.postfix(trainer, pl_module), refresh=False)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if not trainer.sanity_checking:
            self.val_progress_bar.set_description(f"{self.label}: validating")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # it resets the train bar's postfix: put ours back
        if trainer.state.fn == "fit" and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.postfix(trainer, pl_module))

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.test_progress_bar.set_description(f"{self.label}: testing the seen tasks")

    def postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {k.removeprefix("train/"): v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        info: dict[str, Any] = {"epoch": trainer.current_epoch, **metrics}
        done, total = trainer.global_step - self.first_step, self.train_progress_bar.total
        elapsed = time.monotonic() - self.started
        if done > 0 and total:
            left = (total - trainer.global_step) * elapsed / done
            info["sequence ETA"] = duration(sequence_eta(left, elapsed + left, self.fits_left, self.finished_s))
        return info
