"""Readers for the two real benchmarks of CL_Benchmark: SuperNI and Long Sequence.

Layout: ``<data_dir>/<Group>/<task>/{train,dev,test}.json`` (docs/benchmark_data.md). Both formats are
one JSON object with ``Definition`` (a list holding one instruction) and ``Instances`` (a list of
``{"id"?, "input", "output"}``, ``output`` a string or a list of reference strings). They differ in the
prompt template, whether the instruction may be empty, and the metric.

Every input problem is a one-line :class:`DataError` naming the file, task or key: validate_tasks fails early.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gainlora.data.types import DataError, Example, TaskData, undecodable

logger = logging.getLogger(__name__)

GROUPS = {"superni": "SuperNI", "long": "Long_Sequence"}
METRICS = {"superni": "rougeL", "long": "exact_match"}
SELECTIONS = ("carved", "paper")
DATA_ENV = "GAINLORA_DATA"

# The upstream files of 4 MiB or more, absent from partial copies (docs/benchmark_data.md, "What is missing").
KNOWN_MISSING = frozenset(
    f"Long_Sequence/{name}"
    for name in ("dbpedia/train.json", "yahoo/train.json", "yahoo/dev.json", "yahoo/test.json", "yelp/dev.json",
                 "yelp/test.json", "imdb/dev.json", "imdb/test.json", "multirc/dev.json", "multirc/test.json")
)

# Files each selection mode reads. Upstream dev.json is byte-identical to test.json.
_SPLIT_FILES = {"carved": ("train", "test"), "paper": ("train", "dev", "test")}
# Files a task may be carved from alone (load_task's carve_from), e.g. dbpedia without train.json.
CARVE_FILES = ("train", "test")
CARVE_TEST_SIZE = 0.25

PAPER_SELECTION_NOTE = (
    "selection=paper: the validation split is dev.json, which is identical to test.json upstream, "
    "so checkpoint selection looks at the test set (as the reference code does); scores are optimistic"
)


# ---------------------------------------------------------------------------------------------- prompts


def superni_prompt(definition: str, text: str) -> str:
    """SuperNI zero-shot prompt; ``definition`` is ``Definition[0].strip()``."""
    return (
        "Definition: " + definition + "\n\n"
        + "Now complete the following example -\n"
        + "Input: " + text + "\n"
        + "Output: "
    )


def long_sequence_prompt(definition: str, text: str) -> str:
    """Long Sequence prompt; the instruction line is dropped when the definition is empty (copa)."""
    head = definition + "\n" if definition else ""
    return head + text + "\n" + "Output: "


# ---------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class _Instance:
    id: str | None
    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class _Split:
    """One parsed and checked file: the stripped instruction and its instances."""

    definition: str
    instances: tuple[_Instance, ...]


def _read_superni(obj: Any, where: str) -> _Split:
    """SuperNI task file: the prompt uses ``Definition[0]``, so it must exist."""
    definition = _field(obj, "Definition", list, where)
    if not definition or not isinstance(definition[0], str):
        raise DataError(f"{where}: 'Definition' must be a list holding the instruction string")
    return _Split(definition[0].strip(), _read_instances(obj, where))


def _read_long_sequence(obj: Any, where: str) -> _Split:
    """Long Sequence file: ``Definition`` may be ``[]`` (copa) or blank; the prompt then has no instruction."""
    definition = _field(obj, "Definition", list, where)
    if definition and not isinstance(definition[0], str):
        raise DataError(f"{where}: 'Definition' must be a list of strings")
    return _Split(definition[0].strip() if definition else "", _read_instances(obj, where))


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with 'Definition' and 'Instances', got {type(obj).__name__} "
            "(this reader takes the GainLoRA/SAPT format, not O-LoRA's list of sentence/label pairs)"
        )
    if key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: '{key}' must be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _read_instances(obj: dict, where: str) -> tuple[_Instance, ...]:
    raw = _field(obj, "Instances", list, where)
    if not raw:
        raise DataError(f"{where}: 'Instances' is empty")
    instances = []
    for i, inst in enumerate(raw):
        at = f"{where}: Instances[{i}]"
        if not isinstance(inst, dict):
            raise DataError(f"{at} must be an object, got {type(inst).__name__}")
        for key in ("input", "output"):
            if key not in inst:
                raise DataError(f"{at} has no '{key}' key")
        if not isinstance(inst["input"], str):
            raise DataError(f"{at}['input'] must be a string, got {type(inst['input']).__name__}")
        output = inst["output"]
        outputs = (output,) if isinstance(output, str) else output
        if not isinstance(outputs, list | tuple) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise DataError(f"{at}['output'] must be a string or a non-empty list of strings")
        inst_id = inst.get("id")
        if inst_id is not None and not isinstance(inst_id, str):
            raise DataError(f"{at}['id'] must be a string, got {type(inst_id).__name__}")
        instances.append(_Instance(inst_id, inst["input"], tuple(outputs)))
    return tuple(instances)


@dataclass(frozen=True)
class _Format:
    group: str
    metric: str
    read: Callable[[Any, str], _Split]
    prompt: Callable[[str, str], str]


_FORMATS = {
    "superni": _Format(GROUPS["superni"], METRICS["superni"], _read_superni, superni_prompt),
    "long": _Format(GROUPS["long"], METRICS["long"], _read_long_sequence, long_sequence_prompt),
}


# ---------------------------------------------------------------------------------------------- files


def _benchmark_key(benchmark: str) -> str:
    """Accept the short name (``superni``/``long``) or the folder name (``SuperNI``/``Long_Sequence``)."""
    for key, group in GROUPS.items():
        if benchmark in (key, group):
            return key
    raise DataError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(map(repr, GROUPS))}")


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    hint = f"run `make data` to download the benchmark or set {DATA_ENV} to a CL_Benchmark folder"
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise DataError(f"no benchmark data directory given and {DATA_ENV} is not set; {hint}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"benchmark data directory {root} does not exist; {hint}")
    return root


def task_dir(data_dir: str | os.PathLike[str], benchmark: str, task: str) -> Path:
    """``<data_dir>/<Group>/<task>`` (not checked for existence)."""
    if not task or task in (".", "..") or "/" in task or "\\" in task:
        raise DataError(f"invalid task name {task!r}")
    return Path(data_dir) / GROUPS[_benchmark_key(benchmark)] / task


def _check_selection(selection: str) -> tuple[str, ...]:
    if selection not in _SPLIT_FILES:
        raise DataError(f"unknown selection {selection!r}; expected one of {', '.join(map(repr, SELECTIONS))}")
    return _SPLIT_FILES[selection]


def _split_path(root: Path, key: str, task: str, split: str) -> Path:
    """Path of one split file, with a clear error when the group, task or file is missing."""
    group_dir = root / GROUPS[key]
    if not group_dir.is_dir():
        raise DataError(
            f"{group_dir} does not exist: the data directory must be the CL_Benchmark folder "
            f"(holding {GROUPS['superni']}/ and {GROUPS['long']}/); run `make data` or set {DATA_ENV}"
        )
    folder = task_dir(root, key, task)
    if not folder.is_dir():
        available = sorted(p.name for p in group_dir.iterdir() if p.is_dir())
        raise DataError(f"task {task!r} not found in {group_dir} (available: {', '.join(available)})")
    path = folder / f"{split}.json"
    if not path.is_file():
        relative = f"{GROUPS[key]}/{task}/{split}.json"
        if relative in KNOWN_MISSING:
            raise DataError(
                f"{path} is missing: it is one of the 10 upstream files of 4 MiB or more that partial copies "
                "lack (docs/benchmark_data.md, 'What is missing'); run `make data` to download "
                "the full benchmark, or choose tasks that have it"
            )
        raise DataError(f"{path} is missing (task {task!r} needs {split}.json)")
    return path


@functools.lru_cache(maxsize=128)
def _parse_file(path: str, mtime_ns: int, size: int, key: str) -> _Split:
    """Parse and check one file once; mtime and size in the key make an edited file re-read."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is read past
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise undecodable(Path(path)) from None
    return _FORMATS[key].read(obj, path)


def _read_split(root: Path, key: str, task: str, split: str) -> _Split:
    path = _split_path(root, key, task, split)
    stat = path.stat()
    return _parse_file(str(path), stat.st_mtime_ns, stat.st_size, key)


# ---------------------------------------------------------------------------------------------- API


def validate_tasks(
    data_dir: str | os.PathLike[str] | None,
    benchmark: str,
    tasks: Sequence[str],
    *,
    selection: str = "carved",
    carve: Mapping[str, str] | None = None,
) -> None:
    """Check every file that :func:`load_task` will read for ``tasks``; raise :class:`DataError` on the first fault.

    ``carve`` maps a task to the one file it is carved from (see :func:`load_task`).
    Parsed files are cached, so the later ``load_task`` calls do not parse them again.
    """
    key = _benchmark_key(benchmark)
    splits = _check_selection(selection)
    root = _data_root(data_dir)
    if isinstance(tasks, str):
        raise DataError(f"tasks must be a list of task names, got the string {tasks!r}")
    if not tasks:
        raise DataError(f"no tasks given for benchmark {benchmark!r}")
    carve = dict(carve or {})
    for task, source in carve.items():
        _check_carve(task, source, tasks, selection)
    for task in tasks:
        carved = task in carve
        for split in (carve[task],) if carved else splits:
            need = 3 if carved else 2 if split == "train" and selection == "carved" else 1
            if len(_read_split(root, key, task, split).instances) < need:
                parts = "train, validation and test splits" if carved else "a validation split"
                path = task_dir(root, key, task) / f"{split}.json"
                raise DataError(f"{path}: needs at least {need} instances to carve {parts}")


def _check_carve(task: str, source: str, tasks: Sequence[str], selection: str) -> None:
    if source not in CARVE_FILES:
        raise DataError(f"benchmark.carve.{task}={source}: one of {', '.join(CARVE_FILES)} (the file to carve from)")
    if task not in tasks:
        raise DataError(f"benchmark.carve.{task}={source}: {task} is not in the task stream ({', '.join(tasks)})")
    if selection != "carved":
        raise DataError(f"benchmark.carve.{task}={source}: needs benchmark.selection=carved")


def load_task(
    data_dir: str | os.PathLike[str] | None,
    benchmark: str,
    task: str,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: float | int = 0.1,
    selection: str = "carved",
    carve_from: str | None = None,
    carve_test_size: float = CARVE_TEST_SIZE,
) -> TaskData:
    """Load one task as rendered prompts.

    ``selection="carved"``: val is a seeded random part of train.json (``val_size`` a fraction or a count,
    at least 1), test is test.json. ``selection="paper"``: val is dev.json, i.e. the test set, as upstream.
    ``carve_from="train"|"test"``: only that file is read; a ``carve_test_size`` share of it becomes test,
    chosen by a shuffle keyed on the task alone (every seed tests on the same instances), and train and
    val are carved from the rest as above. The parts are disjoint by construction.
    ``max_train`` subsamples train after carving; ``max_eval`` keeps a seeded subset of val and of test.
    Every random choice is keyed on (seed, task, ...), so it does not depend on other tasks or on call order.
    Subsets keep the file order.
    """
    key = _benchmark_key(benchmark)
    splits = _check_selection(selection)
    root = _data_root(data_dir)
    for name, cap in (("max_train", max_train), ("max_eval", max_eval)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise DataError(f"{name} must be a positive integer or None, got {cap!r}")
    notes: list[str] = []
    if carve_from is not None:
        _check_carve(task, carve_from, [task], selection)
        if not isinstance(carve_test_size, float) or not 0.0 < carve_test_size < 1.0:
            raise DataError(f"benchmark.carve_test_size={carve_test_size!r}: a fraction in (0, 1)")
        whole = _render(_read_split(root, key, task, carve_from), _FORMATS[key], task, seed, carve_from)
        rest, test = _carve(whole, carve_test_size, random.Random(f"{task}:{carve_from}:test-carve"), task)
        examples = {"train": rest, "test": test}
        notes.append(f"{task}: train, validation and test carved from {carve_from}.json alone")
    else:
        raw = {split: _read_split(root, key, task, split) for split in splits}
        examples = {split: _render(raw[split], _FORMATS[key], task, seed, split) for split in splits}

    if selection == "carved":
        train, val = _carve(examples["train"], val_size, random.Random(f"{seed}:{task}:carve"), task)
    else:
        train, val = examples["train"], examples["dev"]
        notes.append(PAPER_SELECTION_NOTE)
        logger.warning("task %s: %s", task, PAPER_SELECTION_NOTE)

    # One key for val and test: under selection=paper (dev == test) both keep the same instances.
    return TaskData(
        name=task,
        metric=_FORMATS[key].metric,
        train=_subsample(train, max_train, f"{seed}:{task}:train-cap"),
        val=_subsample(val, max_eval, f"{seed}:{task}:eval-cap"),
        test=_subsample(examples["test"], max_eval, f"{seed}:{task}:eval-cap"),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _render(split: _Split, fmt: _Format, task: str, seed: int, split_name: str) -> list[Example]:
    return [
        Example(
            source=fmt.prompt(split.definition, inst.input),
            target=_pick_target(inst.outputs, f"{seed}:{task}:{split_name}:{index}"),
            references=inst.outputs,
            id=inst.id if inst.id is not None else f"{task}-{index}",
        )
        for index, inst in enumerate(split.instances)
    ]


def _pick_target(outputs: tuple[str, ...], rng_key: str) -> str:
    """One reference to train on; a string key seeds ``random`` identically in every process."""
    if len(outputs) == 1:
        return outputs[0]
    return random.Random(rng_key).choice(outputs)


def _val_count(val_size: float | int, n: int, task: str) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise DataError(f"val_size must be a fraction in (0, 1) or a positive count, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise DataError(f"val_size as a fraction must lie in (0, 1), got {val_size!r}")
        count = max(1, round(val_size * n))
    else:
        if val_size < 1:
            raise DataError(f"val_size as a count must be at least 1, got {val_size!r}")
        count = val_size
    if count >= n:
        raise DataError(f"benchmark.val_size={val_size}: smaller; it leaves no training data for task {task!r} "
                        f"({n} train instances)")
    return count


def _carve(
    examples: list[Example], val_size: float | int, rng: random.Random, task: str
) -> tuple[list[Example], list[Example]]:
    """Split train.json into (train, val) by a seeded shuffle; both keep the file order."""
    n = len(examples)
    if n < 2:
        raise DataError(f"task {task!r}: needs at least 2 train instances to carve a validation split, has {n}")
    order = list(range(n))
    rng.shuffle(order)
    val_indices = set(order[: _val_count(val_size, n, task)])
    train = [ex for i, ex in enumerate(examples) if i not in val_indices]
    val = [ex for i, ex in enumerate(examples) if i in val_indices]
    return train, val


def _subsample(examples: list[Example], cap: int | None, rng_key: str) -> list[Example]:
    """First ``cap`` examples of a seeded shuffle, back in file order (a larger cap keeps a superset)."""
    if cap is None or cap >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(rng_key).shuffle(order)
    return [examples[i] for i in sorted(order[:cap])]
