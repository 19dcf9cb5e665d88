"""In-task checkpoints that really are written on their cadence.

Lightning 2.6's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last.ckpt`` only when
training ends, so a run killed mid-task restarted the task. This callback writes one file every
``every_n_train_steps`` optimizer steps and/or every ``every_n_epochs`` epochs, atomically (temp +
rename): what trains (``ContinualLM.on_save_checkpoint``), the optimizer, the loop state, the
training loader's position in its epoch (``ResumableLoader``) and the RNG state, so a resumed task
continues bit for bit. Checkpoints hold tensors, numbers and strings only: they load with
``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from gainlora.artifacts import ArtifactError, atomic_write


class InTaskCheckpoint(L.Callback):
    def __init__(self, path: Path, *, every_n_train_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        self.path = Path(path)
        self.every_n_train_steps = every_n_train_steps or None
        self.every_n_epochs = every_n_epochs or None
        self._saved_step = -1
        self._rng: dict | None = None  # restored at the first training hook after loading

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n, e = self.every_n_train_steps, self.every_n_epochs
        # global_step counts optimizer steps: with gradient accumulation, save once, after the step.
        step_due = n and trainer.global_step % n == 0
        # An epoch's checkpoint is written after its last batch, not in on_train_epoch_end: Lightning resumes
        # step-based training from a save made there by training one batch of the next epoch as the old
        # epoch's last and then restarting the next epoch (the resumed task diverged from the uninterrupted one).
        epoch_due = e and batch_idx + 1 == trainer.num_training_batches and (trainer.current_epoch + 1) % e == 0
        if (step_due or epoch_due) and trainer.global_step != self._saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            atomic_write(self.path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))
        else:  # a collective call; only global rank 0 writes
            trainer.save_checkpoint(self.path, weights_only=False)

    # -- RNG: dropout masks after the resume point are those of the uninterrupted run ------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng = state_dict.get("rng")

    def _restore_rng(self) -> None:
        # Not at load time: the uninterrupted run drew the epoch's loader seed from the global RNG
        # before a mid-epoch save and after an epoch-end save; restoring at the first epoch start (or,
        # mid-epoch, the first batch start) puts that draw on the same side of the snapshot.
        if self._rng is not None:
            torch.set_rng_state(self._rng["torch"])
            if "cuda" in self._rng:
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._restore_rng()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._restore_rng()


def check_checkpoint(path: Path, task: int, module: torch.nn.Module | None = None) -> Path | None:
    """``path`` if an interrupted attempt left a checkpoint there, after loading it as Lightning will
    (weights_only: a crafted pickle is refused, never run) and, given the re-opened task's ``module``,
    checking it holds what that task trains; ``ArtifactError`` naming it otherwise, instead of a
    traceback from inside ``trainer.fit``."""
    restart = f"delete it to restart task {task + 1} from its beginning"
    for folder in (path.parent.parent, path.parent):  # written into during the task
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder}: not a folder; move it away to resume (it holds in-task checkpoints)")
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch's reader and unpickler raise many kinds
        raise ArtifactError(f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]}"
                            f"); {restart}") from None
    if module is None:
        return path
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    if not (isinstance(state, dict) and all(k in saved for k in ("pytorch-lightning_version", "loops", "global_step"))):
        raise ArtifactError(f"{path}: not a Lightning checkpoint of this run (no state_dict, loops or global_step); "
                            f"{restart}")
    trains = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(state) != set(trains) or any(not isinstance(state[k], torch.Tensor) or state[k].shape != p.shape
                                        for k, p in trains.items()):
        raise ArtifactError(f"{path}: its tensors are not those task {task + 1} trains (names or shapes differ); "
                            f"{restart}")
    return path
