"""benchmark=custom: tasks from local JSONL / CSV files (or save_to_disk folders), checked with
one-line errors that name the file and line, and the example under examples/custom_tasks run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gainlora.data.custom import load_custom_stream
from gainlora.data.tasks import load_stream
from gainlora.data.types import DataError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_tasks"
ROW = {"instruction": "Say it.", "input": "x", "output": "y"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def task_folder(root: Path, name: str = "t", train: list | None = None, test: list | None = None) -> Path:
    write_jsonl(root / name / "train.jsonl", train if train is not None else [ROW] * 4)
    write_jsonl(root / name / "test.jsonl", test if test is not None else [ROW] * 2)
    return root / name


def cfg(*tasks, **extra) -> dict:
    return {"reader": "custom", "tasks": list(tasks), **extra}


def refused(config: dict) -> str:
    with pytest.raises(DataError) as err:
        load_stream(config, seed=0)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_example_reads_as_three_tasks() -> None:
    tasks = load_stream(cfg(str(EXAMPLE / "antonyms"), str(EXAMPLE / "plurals"),
                            {"name": "capitals", "train": str(EXAMPLE / "capitals" / "train.jsonl"),
                             "val": str(EXAMPLE / "capitals" / "val.jsonl"),
                             "test": str(EXAMPLE / "capitals" / "test.jsonl"), "metric": "rougeL"},
                            metric="exact_match"), seed=0)
    assert [t.name for t in tasks] == ["antonyms", "plurals", "capitals"]
    assert [t.metric for t in tasks] == ["exact_match", "exact_match", "rougeL"]
    antonyms, plurals, capitals = tasks
    # No val file: carved from the 36 training rows (10%), as for the built-in readers.
    assert (len(antonyms.train), len(antonyms.val), len(antonyms.test)) == (32, 4, 12)
    assert (len(plurals.train) + len(plurals.val), len(plurals.test)) == (36, 12)  # CSV header not a row
    assert (len(capitals.train), len(capitals.val), len(capitals.test)) == (24, 4, 8)  # its own val file
    first = json.loads((EXAMPLE / "antonyms" / "test.jsonl").read_text().splitlines()[0])
    assert antonyms.test[0].source == ("Definition: Write the opposite of the word.\n\nNow complete the following "
                                       f"example -\nInput: {first['input']}\nOutput: ")
    # A list of outputs is a list of references; the training target is one of them.
    multi = [e for t in tasks for e in t.train + t.val + t.test if len(e.references) > 1]
    assert multi and all(e.target in e.references for e in multi)


def test_long_prompt_and_task_default_instruction(tmp_path: Path) -> None:
    rows = [{"input": f"in{i}", "output": "o"} for i in range(4)]
    spec = {"name": "t", "train": str(write_jsonl(tmp_path / "a.jsonl", rows)),
            "test": str(write_jsonl(tmp_path / "b.jsonl", rows[:1])), "instruction": "Do it."}
    [task] = load_custom_stream(cfg(spec, prompt="long"), seed=0)
    assert task.test[0].source == "Do it.\nin0\nOutput: "


@pytest.mark.parametrize("rows, fragment", [
    ([ROW, ROW, {"instruction": "i", "input": "x"}], "train.jsonl line 3: missing field 'output'"),
    ([ROW, "{not json", ROW], "train.jsonl line 2: not valid JSON"),
    ([ROW, ["a list"]], "train.jsonl line 2: expected a JSON object, got list"),
    ([ROW, {**ROW, "output": []}], "train.jsonl line 2: 'output' must be a non-empty string"),
    ([ROW, {**ROW, "input": 3}], "train.jsonl line 2: 'input' must be a string, got int"),
    ([{"input": "x", "output": "y"}], "train.jsonl line 1: missing field 'instruction'"),
    ([], "train.jsonl: no examples (empty split)"),
    # kept as str(dict) ("{'a': 1}") while the built-in readers refuse it
    ([ROW, {**ROW, "id": {"a": 1}}], "train.jsonl line 2: 'id' must be a string or an integer, got dict"),
])
def test_bad_jsonl_rows_are_named_by_file_and_line(tmp_path: Path, rows: list, fragment: str) -> None:
    folder = task_folder(tmp_path, train=rows)
    assert fragment in refused(cfg(str(folder)))


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, train=[ROW, "", ROW, {"input": "x", "output": "y"}])
    assert "train.jsonl line 4: missing field 'instruction'" in refused(cfg(str(folder)))


@pytest.mark.parametrize("text, fragment", [
    ("instruction,input\ni,x\n", "train.csv line 1: missing column 'output' (header: instruction, input)"),
    ("instruction,input,output\ni,x,y\ni,x,y,extra\n", "train.csv line 3: 4 cells for 3 columns"),
    ('instruction,input,output\ni,x,y\ni,"two\nlines",\n', "train.csv line 4: 'output' must be a non-empty"),
    ("instruction,input,output\ni," + "x" * 200_000 + ",y\n", "train.csv: not a readable CSV file (field larger"),
])
def test_bad_csv_rows_are_named_by_file_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.csv").write_text(text)
    write_jsonl(tmp_path / "t" / "test.jsonl", [ROW])
    assert fragment in refused(cfg(str(tmp_path / "t")))


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv"])
def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path: Path, name: str) -> None:
    """Past the decoder's 8 KiB buffer its offset ("at byte 4833") pointed nowhere in the file."""
    good = json.dumps(ROW) if name.endswith("jsonl") else "i,x,y"
    head = "" if name.endswith("jsonl") else "instruction,input,output\n"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / name).write_bytes((head + (good + "\n") * 500).encode() + b"caf\xe9,x,y\n")
    write_jsonl(tmp_path / "t" / "test.jsonl", [ROW])
    line = 501 + bool(head)
    assert refused(cfg(str(tmp_path / "t"))) == (f"{tmp_path / 't' / name} line {line}: not valid UTF-8 (byte "
                                                 "b'\\xe9' at column 4)")


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a BOM; neither the first JSON line nor the CSV
    header's first column may see it."""
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text("\ufeff" + (json.dumps(ROW) + "\n") * 2, encoding="utf-8")
    write_jsonl(tmp_path / "j" / "test.jsonl", [ROW])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text("\ufeffinstruction,input,output\ni,x,y\ni,x,y\n", encoding="utf-8")
    write_jsonl(tmp_path / "c" / "test.jsonl", [ROW])
    jsonl, csv = load_stream(cfg(str(tmp_path / "j"), str(tmp_path / "c")), seed=0)
    assert [e.references for e in jsonl.train + jsonl.val] == [("y",)] * 2
    assert [e.references for e in csv.train + csv.val] == [("y",)] * 2


def test_bad_task_entries_name_the_key(tmp_path: Path) -> None:
    good = str(task_folder(tmp_path))
    (tmp_path / "notest").mkdir()
    write_jsonl(tmp_path / "notest" / "train.jsonl", [ROW])
    cases = {
        "benchmark.tasks: list your tasks": cfg(),
        f"benchmark.tasks[0]={tmp_path / 'nowhere'}: not a folder": cfg(str(tmp_path / "nowhere")),
        "notest: no test.jsonl or test.csv": cfg(str(tmp_path / "notest")),
        "benchmark.tasks[1]: missing 'test'": cfg(good, {"name": "b", "train": "x"}),
        "benchmark.tasks[0]: unknown keys ['tset']": cfg({"name": "b", "train": "x", "tset": "y"}),
        "benchmark.tasks[0].metric=bleu: expected one of rougeL, exact_match":
            cfg({"name": "b", "train": good + "/train.jsonl", "test": good + "/test.jsonl", "metric": "bleu"}),
        "benchmark.metric=f1": cfg(good, metric="f1"),
        "benchmark.prompt=chat": cfg(good, prompt="chat"),
        f"benchmark.tasks[1]={good}: a task named 't' is already task 1 ({good}); each name once": cfg(good, good),
        # two folders of one name (a/t, b/t): the message listed the names only, ['t', 't']
        f"benchmark.tasks[1]={tmp_path / 'b' / 't'}: a task named 't' is already task 1 ({tmp_path / 'a' / 't'})":
            cfg(str(task_folder(tmp_path / "a")), str(task_folder(tmp_path / "b"))),
        "unsupported file type '.txt'": cfg({"name": "b", "train": str(write_jsonl(tmp_path / "x.txt", [ROW])),
                                             "test": good}),
        # a split that is no path (an override such as train:[a]) was a TypeError traceback
        "benchmark.tasks[0].train=['a']: a file path (.jsonl or .csv) or a save_to_disk folder":
            cfg({"name": "b", "train": ["a"], "test": good + "/test.jsonl"}),
        "benchmark.tasks[0].test=5: a file path": cfg({"name": "b", "train": good + "/train.jsonl", "test": 5}),
        # a task name is a folder of the run directory: past 255 bytes the first save would fail
        "benchmark.tasks[0]: task name 'aaaaa": cfg({"name": "a" * 101, "train": good + "/train.jsonl",
                                                      "test": good + "/test.jsonl"}),
    }
    for fragment, config in cases.items():
        assert fragment in refused(config), fragment


def test_save_to_disk_folders_are_tasks(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    from datasets.table import InMemoryTable

    def dataset(rows: list[dict], tag: str):  # an explicit fingerprint skips datasets' dill hashing
        return datasets.Dataset(InMemoryTable(pa.Table.from_pylist(rows)), fingerprint=tag)

    rows = [{"instruction": "Say it.", "input": f"x{i}", "output": ["y", "z"]} for i in range(4)]
    datasets.DatasetDict({"train": dataset(rows, "a"), "validation": dataset(rows[:1], "b"),
                          "test": dataset(rows[:2], "c")}).save_to_disk(str(tmp_path / "hf"))
    dataset(rows[:3], "d").save_to_disk(str(tmp_path / "one_split"))
    [folder, mapped] = load_stream(cfg(str(tmp_path / "hf"), {"name": "m", "train": str(tmp_path / "one_split"),
                                                              "test": str(tmp_path / "one_split")}), seed=0)
    assert folder.name == "hf" and (len(folder.train), len(folder.val), len(folder.test)) == (4, 1, 2)
    assert folder.test[1].references == ("y", "z") and "Input: x1" in folder.test[1].source
    assert len(mapped.train) + len(mapped.val) == 3
    datasets.DatasetDict({"train": dataset(rows, "e")}).save_to_disk(str(tmp_path / "notest"))
    assert "has no 'test' split (has: train)" in refused(cfg(str(tmp_path / "notest")))
    bad = [{"instruction": "i", "input": "x", "output": None}] * 2
    datasets.DatasetDict({"train": dataset(bad, "f"), "test": dataset(bad, "g")}).save_to_disk(str(tmp_path / "bad"))
    assert f"{tmp_path / 'bad'}[train] row 0: missing field 'output'" in refused(cfg(str(tmp_path / "bad")))
    # a one-split Dataset given as a task folder read "no train.jsonl or train.csv"
    assert f"{tmp_path / 'one_split'}: a save_to_disk Dataset of one split" in refused(cfg(str(tmp_path / "one_split")))


def test_a_split_that_is_a_folder_is_named(tmp_path: Path) -> None:
    """train.jsonl made as a folder read "no train.jsonl or train.csv", which it has."""
    (tmp_path / "t" / "train.jsonl").mkdir(parents=True)
    write_jsonl(tmp_path / "t" / "test.jsonl", [ROW])
    assert f"{tmp_path / 't' / 'train.jsonl'}: not a file" in refused(cfg(str(tmp_path / "t")))


def test_a_bad_file_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    """run() raises the DataError that the entry point prints as its one `error:` line (exit 2)."""
    from gainlora.run import USER_ERRORS, run

    folder = task_folder(tmp_path, train=[ROW, ROW, ROW, {"input": "x"}])
    with pytest.raises(USER_ERRORS) as err:
        run(compose_run("experiment=demo", "backbone=tiny_t5_test", "benchmark=custom", f"benchmark.tasks=[{folder}]",
                        f"paths.runs_dir={tmp_path / 'runs'}"))
    assert str(err.value) == f"{folder}/train.jsonl line 4: missing field 'instruction'"
    assert not (tmp_path / "runs").exists()


def compose_run(*overrides: str):
    from gainlora.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.slow
def test_the_example_runs_end_to_end(tmp_path: Path) -> None:
    """The README's command, on the test backbone with 2 steps per task."""
    from gainlora.run import run

    readme = (EXAMPLE / "README.md").read_text()
    tasks = "benchmark.tasks=[examples/custom_tasks/antonyms,examples/custom_tasks/plurals]"
    assert tasks in readme
    results = run(compose_run(
        "experiment=demo", "benchmark=custom", tasks.replace("examples/", f"{ROOT}/examples/"),
        "benchmark.metric=exact_match", "exp_name=custom", "backbone=tiny_t5_test", "trainer.max_steps=2",
        "trainer.enable_progress_bar=false", f"paths.runs_dir={tmp_path}", "run_id=r"))
    assert results["tasks"] == ["antonyms", "plurals"] and results["metric"] == "exact_match"
    assert len(results["matrix"]) == 2
    assert (tmp_path / "custom" / "r" / "tasks" / "02-plurals" / "DONE").is_file()
