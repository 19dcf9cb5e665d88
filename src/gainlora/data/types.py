"""Plain data types shared by every benchmark reader and the data module."""
from __future__ import annotations

from dataclasses import dataclass, field

PAD_TASK = -1  # task index of the rows that even out evaluation shards across ranks; never scored


class DataError(ValueError):
    """Bad benchmark input. The message names the file, task or key at fault."""


@dataclass(frozen=True)
class Example:
    """One instance, already rendered as a prompt.

    ``target`` is what the model is trained on; ``references`` are every gold answer the
    prediction is scored against (max over references).
    """

    source: str
    target: str
    references: tuple[str, ...]
    id: str = ""


@dataclass
class TaskData:
    """Splits of one task. ``metric`` is ``"rougeL"`` or ``"exact_match"``."""

    name: str
    metric: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)  # e.g. "selection=paper: val is the test set"
