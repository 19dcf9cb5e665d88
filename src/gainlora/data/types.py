"""Plain data types shared by every benchmark reader and the data module."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PAD_TASK = -1  # task index of the rows that even out evaluation shards across ranks; never scored


class DataError(ValueError):
    """Bad benchmark input. The message names the file, task or key at fault."""


def undecodable(path: Path) -> DataError:
    """The first line that is not UTF-8, by number: the decoder's offset counts from its read buffer
    (8 KiB), not from the file, so "at byte 4833" pointed nowhere in a 30 KB file."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                return DataError(f"{path} line {number}: not valid UTF-8 (byte {raw[err.start:err.start + 1]!r} at "
                                 f"column {err.start + 1})")
    return DataError(f"{path}: not valid UTF-8")


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
