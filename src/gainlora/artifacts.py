"""The run directory (ARCHITECTURE.md, "Run directory contract"), written atomically.

Every file is written to a temporary name in its own directory and renamed into place, and a task
directory counts as finished only once its DONE marker exists, so a crash never leaves a
half-written artifact that looks complete. Tensors are safetensors and metadata JSON: nothing is
ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

DONE = "DONE"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and rename tmp onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    # Own storage per entry: safetensors refuses tensors that share memory (q and v share a memory).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


class RunDir:
    """``runs/<experiment>/<run_id>/`` with config.yaml, results.json, metrics.csv, tasks/, plots/."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def checkpoint_dir(self, task: int, name: str) -> Path:
        """Lightning checkpoints of an unfinished task (resume inside a task)."""
        return self.root / "checkpoints" / f"{task + 1:02d}-{name}"

    def task_dir(self, task: int, name: str) -> Path:
        return self.root / "tasks" / f"{task + 1:02d}-{name}"

    def is_done(self, task: int, name: str) -> bool:
        return (self.task_dir(task, name) / DONE).is_file()

    def save_task(self, task: int, name: str, files: dict[str, dict[str, Tensor]], meta: dict) -> Path:
        """Write a finished task's tensors (one safetensors file per key) and meta.json, then DONE.

        Files go into a fresh staging directory that is renamed into place, so an interrupted save
        leaves no partial task directory behind.
        """
        final = self.task_dir(task, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            for stem, tensors in files.items():
                if tensors:
                    write_tensors(staging / f"{stem}.safetensors", tensors)
            write_json(staging / "meta.json", meta)
            (staging / DONE).write_text("")
            if final.exists():  # an unfinished leftover of a crashed attempt
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return final

    def load_task(self, task: int, name: str) -> tuple[dict[str, dict[str, Tensor]], dict]:
        folder = self.task_dir(task, name)
        if not (folder / DONE).is_file():
            raise FileNotFoundError(f"{folder}: task not finished (no {DONE} marker)")
        files = {p.stem: read_tensors(p) for p in sorted(folder.glob("*.safetensors"))}
        return files, json.loads((folder / "meta.json").read_text())
