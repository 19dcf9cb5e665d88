"""Your own task streams from local files: ``benchmark=custom`` (conf/benchmark/custom.yaml).

Each entry of ``benchmark.tasks`` is one task, learned in list order:

- a folder holding ``train`` and ``test`` (optionally ``val``) as ``.jsonl`` or ``.csv`` files, or a
  Hugging Face ``datasets`` folder written by ``DatasetDict.save_to_disk`` (splits ``train``,
  ``test``, optionally ``validation``); the task is named after the folder;
- or a mapping ``{name, train, test, val?, metric?, instruction?}`` naming each split's file (or
  ``save_to_disk`` folder of one split).

Rows have ``input`` and ``output`` (a string, or in JSONL a list of reference strings; a CSV cell
is one reference), ``instruction`` (may be left out when the task gives a default ``instruction``)
and optionally ``id``. Prompts use ``benchmark.prompt`` (``superni`` or ``long``, the built-in
templates); scores use the task's ``metric``, else ``benchmark.metric`` (``rougeL`` or
``exact_match``). Without a val split, validation is carved from train as for the built-in readers.

Every file is read and checked before anything trains: a problem is a one-line
:class:`DataError` naming the file and line (``tasks/a/train.jsonl line 7: missing field 'output'``).
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gainlora.data.benchmarks import _carve, _pick_target, _subsample, long_sequence_prompt, superni_prompt
from gainlora.data.types import DataError, Example, TaskData, undecodable
from gainlora.metrics import SCORERS

PROMPTS = {"superni": superni_prompt, "long": long_sequence_prompt}
SPLITS = ("train", "val", "test")
SUFFIXES = (".jsonl", ".csv")
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # our split -> datasets' name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a task name becomes a folder of the run directory
Row = tuple[str, dict[str, Any]]  # (where: "file line N", fields)


def load_custom_stream(cfg: Mapping, seed: int) -> list[TaskData]:
    """Read and check every task of ``cfg.tasks`` (nothing is returned until all are valid)."""
    entries = cfg.get("tasks")
    if not entries or isinstance(entries, str):
        raise DataError("benchmark.tasks: list your tasks, e.g. benchmark.tasks=[path/to/task_a,path/to/task_b] "
                        "(folders with train and test .jsonl/.csv files; see examples/custom_tasks)")
    entries = list(entries)
    if cfg.get("num_tasks"):
        entries = entries[: int(cfg["num_tasks"])]
    prompt = cfg.get("prompt", "superni")
    if prompt not in PROMPTS:
        raise DataError(f"benchmark.prompt={prompt}: expected one of {', '.join(PROMPTS)}")
    default_metric = _metric(cfg.get("metric", "rougeL"), "benchmark.metric")
    specs = [_task_spec(i, entry, default_metric) for i, entry in enumerate(entries)]
    names = [s["name"] for s in specs]
    for j, name in enumerate(names):  # a task's name is its folder in the run directory
        if name in names[:j]:
            i = names.index(name)
            raise DataError(f"benchmark.tasks[{j}]={_shown(entries[j])}: a task named '{name}' is already task {i + 1} "
                            f"({_shown(entries[i])}); each name once (a folder task is named after its folder: rename "
                            "one, or give it a mapping {name, train, test})")
    return [_load(spec, PROMPTS[prompt], seed, cfg) for spec in specs]


def _shown(entry: Any) -> str:
    return str(entry) if isinstance(entry, str | Path) else f"{{name: {entry.get('name')}, ...}}"


def _metric(value: Any, key: str) -> str:
    if value not in SCORERS:
        raise DataError(f"{key}={value}: expected one of {', '.join(SCORERS)}")
    return value


def _task_spec(i: int, entry: Any, default_metric: str) -> dict[str, Any]:
    """{name, metric, instruction, files: {split: path}} of one ``benchmark.tasks`` entry."""
    key = f"benchmark.tasks[{i}]"
    if isinstance(entry, str | Path):
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise DataError(f"{key}={entry}: not a folder; give a task folder (train and test files) "
                            "or a mapping {name, train, test}")
        spec = {"name": folder.resolve().name, "files": _folder_files(folder), "metric": default_metric,
                "instruction": None}
    elif isinstance(entry, Mapping):
        unknown = set(entry) - {"name", "train", "val", "test", "metric", "instruction"}
        if unknown:
            raise DataError(f"{key}: unknown keys {sorted(unknown)}; accepted: name, train, val, test, metric, "
                            "instruction")
        for needed in ("name", "train", "test"):
            if not entry.get(needed):
                raise DataError(f"{key}: missing '{needed}'")
        for split in SPLITS:
            if entry.get(split) is not None and not isinstance(entry[split], str):
                raise DataError(f"{key}.{split}={entry[split]}: a file path (.jsonl or .csv) or a save_to_disk folder")
        files = {split: Path(entry[split]).expanduser() for split in SPLITS if entry.get(split)}
        for split, path in files.items():
            if not path.exists():
                raise DataError(f"{key}.{split}={entry[split]}: no such file")
        instruction = entry.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise DataError(f"{key}.instruction: must be a string")
        spec = {"name": str(entry["name"]), "files": files, "instruction": instruction,
                "metric": _metric(entry.get("metric", default_metric), f"{key}.metric")}
    else:
        raise DataError(f"{key}: a task is a folder path or a mapping {{name, train, test}}, "
                        f"got {type(entry).__name__}")
    if not NAME.match(spec["name"]):
        raise DataError(f"{key}: task name {spec['name']!r} must be 1-100 letters, digits, '_', '-' or '.'")
    return spec


def _folder_files(folder: Path) -> dict[str, Path] | Path:
    """{split: file} of a task folder, or the folder itself when it is a saved DatasetDict."""
    if (folder / "dataset_dict.json").is_file():
        return folder
    if (folder / "state.json").is_file():  # Dataset.save_to_disk: one split, not a task
        raise DataError(f"{folder}: a save_to_disk Dataset of one split; save a DatasetDict with train and test "
                        "splits, or name each split's folder in a mapping {name, train, test}")
    files = {}
    for split in SPLITS:
        odd = [p for p in (folder / f"{split}{suffix}" for suffix in SUFFIXES) if p.exists() and not p.is_file()]
        if odd:
            raise DataError(f"{odd[0]}: not a file (a split is one .jsonl or .csv file)")
        found = [folder / f"{split}{suffix}" for suffix in SUFFIXES if (folder / f"{split}{suffix}").is_file()]
        if len(found) > 1:
            raise DataError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
        if found:
            files[split] = found[0]
        elif split != "val":
            raise DataError(f"{folder}: no {split}.jsonl or {split}.csv (a task folder needs train and test, "
                            "optionally val)")
    return files


def _load(spec: dict[str, Any], prompt, seed: int, cfg: Mapping) -> TaskData:
    name = spec["name"]
    split_rows = _dataset_dict_rows(spec["files"]) if isinstance(spec["files"], Path) else {
        split: _rows(path) for split, path in spec["files"].items()}
    examples = {split: [_example(where, row, spec["instruction"], prompt, f"{seed}:{name}:{split}:{i}", name, i)
                        for i, (where, row) in enumerate(rows)]
                for split, rows in split_rows.items()}
    if "val" in examples:
        train, val = examples["train"], examples["val"]
    else:
        train, val = _carve(examples["train"], cfg.get("val_size", 0.1), random.Random(f"{seed}:{name}:carve"),
                            name)
    max_train, max_eval = cfg.get("max_train_per_task"), cfg.get("max_eval_per_task")
    return TaskData(name=name, metric=spec["metric"],
                    train=_subsample(train, max_train, f"{seed}:{name}:train-cap"),
                    val=_subsample(val, max_eval, f"{seed}:{name}:eval-cap"),
                    test=_subsample(examples["test"], max_eval, f"{seed}:{name}:eval-cap"))


def _example(where: str, row: dict[str, Any], instruction: str | None, prompt, key: str, task: str,
             index: int) -> Example:
    for field in ("input", "output") if instruction is not None else ("instruction", "input", "output"):
        if field not in row or row[field] is None:
            raise DataError(f"{where}: missing field '{field}'")
    text = row.get("instruction", instruction)
    for field, value in (("instruction", text), ("input", row["input"])):
        if not isinstance(value, str):
            raise DataError(f"{where}: '{field}' must be a string, got {type(value).__name__}")
    output = row["output"]
    outputs = [output] if isinstance(output, str) else output
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o.strip() for o in outputs):
        raise DataError(f"{where}: 'output' must be a non-empty string or a non-empty list of non-empty strings")
    references = tuple(outputs)
    given = row.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, str | int)):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(given).__name__}")
    return Example(source=prompt(text.strip(), row["input"]), target=_pick_target(references, key),
                   references=references, id=str(given) if given else f"{task}-{index}")


def _rows(path: Path) -> list[Row]:
    if path.is_dir():
        return _dataset_rows(path)
    readers = {".jsonl": jsonl_rows, ".csv": _csv_rows}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .jsonl, .csv or a "
                        "save_to_disk folder")
    try:
        rows = list(readers[path.suffix](path))
    except UnicodeDecodeError:
        raise undecodable(path) from None
    except csv.Error as err:  # a NUL byte, a cell past the csv module's field size limit
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise DataError(f"{path}: no examples (empty split)")
    return rows


def jsonl_rows(path: Path) -> Iterator[Row]:
    """("<file> line N", object) for every non-blank line; a DataError names the first bad one."""
    with path.open(encoding="utf-8-sig") as handle:
        try:
            lines = list(enumerate(handle, 1))
        except UnicodeDecodeError:
            raise undecodable(path) from None
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: nested too deeply to read") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:  # a lone surrogate (\ud800) parses, but no UTF-8 file or tokenizer takes it
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"{where}: not valid Unicode ({err.object[err.start:err.end]!r} is a lone "
                            "surrogate)") from None
        yield where, row


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for needed in ("input", "output"):
            if needed not in columns:
                raise DataError(f"{path} line 1: missing column '{needed}' (header: {', '.join(columns) or 'none'})")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:  # more cells than header columns
                raise DataError(f"{where}: {len(columns) + len(row[None])} cells for {len(columns)} columns")
            yield where, row


def _dataset_rows(path: Path, split: str | None = None) -> list[Row]:
    dataset = _load_from_disk(path)
    if split is not None:
        dataset = dataset[split]
    elif hasattr(dataset, "keys"):
        raise DataError(f"{path}: a DatasetDict; name the task's folder instead of one split")
    name = f"{path}[{split}]" if split else str(path)
    rows = [(f"{name} row {i}", dict(row)) for i, row in enumerate(dataset)]
    if not rows:
        raise DataError(f"{name}: no examples (empty split)")
    return rows


def _dataset_dict_rows(folder: Path) -> dict[str, list[Row]]:
    splits = set(_load_from_disk(folder).keys())
    out = {}
    for ours, theirs in HF_SPLITS.items():
        if theirs in splits:
            out[ours] = _dataset_rows(folder, theirs)
        elif ours != "val":
            raise DataError(f"{folder}: the DatasetDict has no '{theirs}' split (has: {', '.join(sorted(splits))})")
    return out


def _load_from_disk(path: Path):
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a save_to_disk folder needs the `datasets` package "
                        "(pip install datasets), or give the splits as .jsonl/.csv files") from None
    try:
        return load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets' and pyarrow's many error types for a damaged folder
        reason = (str(err) or type(err).__name__).splitlines()[0]
        raise DataError(f"{path}: not a readable save_to_disk folder ({reason})") from None
