"""Benchmark readers: exact prompts and splits on the real files, clear errors on crafted bad ones.

Tests on the real benchmark need GAINLORA_DATA (a CL_Benchmark folder) and skip without it; the tests on
crafted files in tmp_path always run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from gainlora.data import benchmarks
from gainlora.data.benchmarks import GROUPS, load_task, task_dir, validate_tasks
from gainlora.data.types import DataError

TASK363 = "task363_sst2_polarity_classification"
TASK002 = "task002_quoref_answer_generation"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("GAINLORA_DATA")
    if not value:
        pytest.skip("GAINLORA_DATA is not set (point it at CL_Benchmark to run the real-data tests)")
    root = Path(value)
    if not (root / "SuperNI").is_dir() or not (root / "Long_Sequence").is_dir():
        pytest.skip(f"GAINLORA_DATA={value} does not hold SuperNI/ and Long_Sequence/")
    return root


# ------------------------------------------------------------------------------------- real data: prompts


@pytest.mark.data
def test_superni_prompt_is_exact(data_dir: Path) -> None:
    test = load_task(data_dir, "superni", TASK363).test
    expected = (
        "Definition: In this task, you are given sentences from movie reviews. "
        'The task is to classify a sentence as "POS" if the sentiment of the sentence is positive '
        'or as "NEG" if the sentiment of the sentence is negative'
        "\n\nNow complete the following example -\n"
        "Input: Making such a tragedy the backdrop to a love story risks trivializing it , though Chouraqui no doubt "
        "intended the film to affirm love 's power to help people endure almost unimaginable horror .\n"
        "Output: "
    )
    assert test[0].source == expected
    assert (test[0].target, test[0].references) == ("POS", ("POS",))
    assert test[0].id == "task363-07ef2e264ea04d22a00211d67916f052"


@pytest.mark.data
def test_long_sequence_prompts_are_exact(data_dir: Path) -> None:
    # cb: Definition without a trailing newline; the instances carry no id.
    cb = load_task(data_dir, "long", "cb").test[0]
    assert cb.source == (
        "Given a pair of sentences 1 and 2, identify the relationship between them.\n"
        "sentence 1: Valence the void-brain, Valence the virtuous valet. "
        "Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did he think he was helping?\n"
        "sentence 2: Valence was helping\n"
        "Output: "
    )
    assert (cb.target, cb.references, cb.id) == ("contradiction", ("contradiction",), "cb-0")

    # copa: Definition is [], so the prompt starts with the input.
    copa = load_task(data_dir, "long", "copa").test[0]
    assert copa.source == (
        'Which sentence is the effect of "The man turned on the faucet."? Choose one between A and B.\n'
        "A: The toilet filled with water.\nB: Water flowed from the spout.\n"
        "Output: "
    )
    assert copa.target == "B"

    # agnews: Definition ends in "\n" (stripped, then one "\n" added); the input itself ends in "\n".
    agnews = load_task(data_dir, "long", "agnews", max_train=1).test[0]
    assert agnews.source == (
        "Please categorize the topics of the news article given below.\n"
        "Title: Up, down and away: NASA #39;s  #39;Weightless Wonder #39; makes final flight\n"
        "Text: HOUSTON -- The NASA turbojet notoriously known as the  quot;vomit comet quot; for its use in training "
        "astronauts for weightlessness made its final flight Friday.\n\n"
        "Output: "
    )
    assert agnews.target == "Science or Technology"


@pytest.mark.data
def test_metrics_per_benchmark(data_dir: Path) -> None:
    assert load_task(data_dir, "superni", TASK363).metric == "rougeL"
    assert load_task(data_dir, "long", "cb").metric == "exact_match"
    assert load_task(data_dir, "SuperNI", TASK363).metric == "rougeL"  # folder names are accepted too


# ------------------------------------------------------------------------------------- real data: targets


def _by_id(task: Any) -> dict[str, Any]:
    return {ex.id: ex for ex in [*task.train, *task.val, *task.test]}


@pytest.mark.data
def test_list_outputs_give_all_references(data_dir: Path) -> None:
    examples = _by_id(load_task(data_dir, "superni", TASK002))
    train_ex = examples["task002-8e5ee99864b149a49fe861ff44baff80"]  # train.json Instances[45]
    assert train_ex.references == ("Columbus.", "Nathaniel.")
    test_ex = examples["task002-e0a8ae89806c496c9c4f6b4b9d4fe00b"]  # test.json Instances[5]
    assert test_ex.references == ("Karluk.", "Alaska.", "Mary Sachs.")
    assert all(ex.target in ex.references for ex in examples.values())


@pytest.mark.data
def test_target_choice_is_seeded_and_independent_of_caps(data_dir: Path) -> None:
    def targets(**kwargs: Any) -> dict[str, str]:
        task = load_task(data_dir, "superni", TASK002, **kwargs)
        return {ex.id: ex.target for ex in task.train if len(ex.references) > 1}

    first = targets(seed=0)
    assert len(first) > 50
    assert targets(seed=0) == first
    assert targets(seed=1) != first  # 90+ independent draws: all equal by chance is below 2**-50
    capped = targets(seed=0, max_train=300)
    assert capped and all(first[i] == t for i, t in capped.items())
    # The draw is not stuck on one position: both first and later references are chosen.
    references = {ex.id: ex.references for ex in load_task(data_dir, "superni", TASK002).train}
    positions = {references[i].index(t) for i, t in first.items()}
    assert 0 in positions and len(positions) > 1


# ------------------------------------------------------------------------------------- real data: splits


@pytest.mark.data
def test_carved_val_is_disjoint_from_train(data_dir: Path) -> None:
    task = load_task(data_dir, "superni", TASK363, seed=3)
    train, val, test = ({ex.id for ex in split} for split in (task.train, task.val, task.test))
    assert (len(train), len(val), len(test)) == (900, 100, 100)
    assert not train & val and not (train | val) & test
    assert task.notes == []

    counted = load_task(data_dir, "superni", TASK363, seed=3, val_size=25)
    assert len(counted.val) == 25 and len(counted.train) == 975
    other_seed = load_task(data_dir, "superni", TASK363, seed=4)
    assert {ex.id for ex in other_seed.val} != val
    again = load_task(data_dir, "superni", TASK363, seed=3)
    assert [ex.id for ex in again.val] == [ex.id for ex in task.val]


@pytest.mark.data
def test_caps_are_seeded_subsets(data_dir: Path) -> None:
    full = load_task(data_dir, "long", "rte", seed=0)
    small = load_task(data_dir, "long", "rte", seed=0, max_train=40, max_eval=10)
    assert (len(small.train), len(small.val), len(small.test)) == (40, 10, 10)
    assert {ex.id for ex in small.train} <= {ex.id for ex in full.train}
    assert {ex.id for ex in small.val} <= {ex.id for ex in full.val}
    assert {ex.id for ex in small.test} <= {ex.id for ex in full.test}
    assert [ex.id for ex in small.test] != [ex.id for ex in full.test[:10]]  # a shuffle, not a prefix

    again = load_task(data_dir, "long", "rte", seed=0, max_train=40, max_eval=10)
    assert [ex.id for ex in again.train] == [ex.id for ex in small.train]
    assert [ex.id for ex in again.test] == [ex.id for ex in small.test]
    larger = load_task(data_dir, "long", "rte", seed=0, max_eval=20)
    assert {ex.id for ex in small.test} <= {ex.id for ex in larger.test}
    other = load_task(data_dir, "long", "rte", seed=1, max_train=40)
    assert {ex.id for ex in other.train} != {ex.id for ex in small.train}


@pytest.mark.data
def test_paper_selection_uses_dev_and_says_so(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=benchmarks.__name__):
        task = load_task(data_dir, "long", "cb", selection="paper", max_eval=20)
    assert len(task.train) == 250  # nothing carved
    assert [ex.id for ex in task.val] == [ex.id for ex in task.test]  # dev.json == test.json upstream
    assert [ex.source for ex in task.val] == [ex.source for ex in task.test]
    assert any("selection=paper" in note and "test set" in note for note in task.notes)
    assert any("test set" in record.getMessage() for record in caplog.records)


@pytest.mark.data
def test_validate_accepts_every_present_task_and_fills_the_cache(data_dir: Path) -> None:
    superni = sorted(p.name for p in (data_dir / "SuperNI").iterdir())
    assert len(superni) == 15
    long_tasks = ["agnews", "amazon", "boolq", "cb", "copa", "mnli", "qqp", "rte", "sst2", "wic"]
    benchmarks._parse_file.cache_clear()
    validate_tasks(data_dir, "superni", superni)
    validate_tasks(data_dir, "long", long_tasks, selection="paper")
    parsed = benchmarks._parse_file.cache_info().misses
    load_task(data_dir, "superni", TASK363)
    load_task(data_dir, "long", "agnews", selection="paper")
    assert benchmarks._parse_file.cache_info().misses == parsed  # served from the cache, not re-parsed


@pytest.mark.data
def test_known_missing_file_in_the_real_copy(data_dir: Path) -> None:
    if (data_dir / "Long_Sequence" / "yahoo" / "train.json").exists():
        pytest.skip("this copy has the full benchmark (yahoo/train.json present)")
    with pytest.raises(DataError, match="partial copies lack"):
        validate_tasks(data_dir, "long", ["cb", "yahoo"])


# ------------------------------------------------------------------------------------- crafted files

SUPERNI_TASK = "task1_demo"
LONG_TASK = "demo"


def _superni_file(instances: list[dict]) -> dict:
    return {"Definition": ["  Answer the question.\n"], "Positive Examples": [], "Instances": instances}


def _write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2), encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A valid miniature CL_Benchmark: one SuperNI task and one Long Sequence dataset."""
    root = tmp_path / "CL_Benchmark"
    sn = root / "SuperNI" / SUPERNI_TASK
    train = [{"id": f"task1-{i}", "input": f"q{i}", "output": [f"a{i}", f"b{i}"]} for i in range(10)]
    _write(sn / "train.json", _superni_file(train))
    for split in ("dev", "test"):
        _write(sn / f"{split}.json", _superni_file([{"id": "task1-t0", "input": "qt", "output": "at"}]))
    ls = root / "Long_Sequence" / LONG_TASK
    for split in ("train", "dev", "test"):
        body = {"Definition": [], "Instances": [{"input": f"x{i}", "output": "yes"} for i in range(4)]}
        _write(ls / f"{split}.json", body)
    (root / "Long_Sequence" / "yahoo").mkdir()  # upstream has it; the shared copy lacks yahoo/train.json
    _write(root / "Long_Sequence" / "yahoo" / "labels.json", ["Sports"])
    return root


def _sn(root: Path, split: str = "train") -> Path:
    return root / "SuperNI" / SUPERNI_TASK / f"{split}.json"


def _edit(split: str, change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """A case setup that rewrites one crafted SuperNI file after ``change`` mutates it in place."""

    def setup(root: Path) -> None:
        obj = json.loads(_sn(root, split).read_text())
        change(obj)
        _write(_sn(root, split), obj)

    return setup


def _no_setup(root: Path) -> None:
    return None


# (case id, setup(root), data_dir from root, benchmark, task, fragments the one-line message must hold)
BAD_INPUTS = [
    ("data-dir-missing", _no_setup, lambda r: r.parent / "absent", "superni", SUPERNI_TASK,
     ["absent does not exist", "make data", "GAINLORA_DATA"]),
    ("group-dir-missing", lambda r: (r / "Long_Sequence").rename(r.parent / "moved"), None, "long", LONG_TASK,
     ["Long_Sequence does not exist", "CL_Benchmark folder"]),
    ("unknown-benchmark", _no_setup, None, "glue", SUPERNI_TASK, ["unknown benchmark 'glue'"]),
    ("task-missing", _no_setup, None, "superni", "task9_nope", ["task 'task9_nope' not found", SUPERNI_TASK]),
    ("train-missing", lambda r: _sn(r).unlink(), None, "superni", SUPERNI_TASK,
     [f"{SUPERNI_TASK}/train.json is missing"]),
    ("known-missing", _no_setup, None, "long", "yahoo",
     ["yahoo/train.json is missing", "partial copies lack", "docs/benchmark_data.md", "make data"]),
    ("malformed-json", lambda r: _write(_sn(r), '{"Definition": ["d"],\n  "Instances": [}'), None, "superni",
     SUPERNI_TASK, ["train.json: malformed JSON at line 2, column 17"]),
    ("malformed-test-json", lambda r: _write(_sn(r, "test"), "{"), None, "superni", SUPERNI_TASK,
     ["test.json: malformed JSON at line 1"]),
    ("not-an-object", lambda r: _write(_sn(r), [{"sentence": "s", "label": "l"}]), None, "superni", SUPERNI_TASK,
     ["train.json: expected a JSON object", "O-LoRA"]),
    ("no-definition", _edit("train", lambda o: o.pop("Definition")), None, "superni", SUPERNI_TASK,
     ["train.json: missing key 'Definition'"]),
    ("empty-superni-definition", _edit("train", lambda o: o.update(Definition=[])), None, "superni",
     SUPERNI_TASK, ["'Definition' must be a list holding the instruction string"]),
    ("definition-not-list", _edit("train", lambda o: o.update(Definition="d")), None, "superni", SUPERNI_TASK,
     ["'Definition' must be a list, got str"]),
    ("no-instances", _edit("test", lambda o: o.pop("Instances")), None, "superni", SUPERNI_TASK,
     ["test.json: missing key 'Instances'"]),
    ("empty-instances", _edit("train", lambda o: o.update(Instances=[])), None, "superni", SUPERNI_TASK,
     ["train.json: 'Instances' is empty"]),
    ("instances-not-list", _edit("train", lambda o: o.update(Instances={})), None, "superni", SUPERNI_TASK,
     ["'Instances' must be a list, got dict"]),
    ("no-input", _edit("train", lambda o: o["Instances"][3].pop("input")), None, "superni", SUPERNI_TASK,
     ["train.json: Instances[3] has no 'input' key"]),
    ("no-output", _edit("train", lambda o: o["Instances"][4].pop("output")), None, "superni", SUPERNI_TASK,
     ["Instances[4] has no 'output' key"]),
    ("instance-not-object", _edit("train", lambda o: o["Instances"].append("x")), None, "superni", SUPERNI_TASK,
     ["Instances[10] must be an object, got str"]),
    ("input-not-str", _edit("train", lambda o: o["Instances"][0].update(input=5)), None, "superni", SUPERNI_TASK,
     ["Instances[0]['input'] must be a string, got int"]),
    ("output-int", _edit("train", lambda o: o["Instances"][1].update(output=1)), None, "superni", SUPERNI_TASK,
     ["Instances[1]['output'] must be a string or a non-empty list of strings"]),
    ("output-empty-list", _edit("train", lambda o: o["Instances"][2].update(output=[])), None, "superni",
     SUPERNI_TASK, ["Instances[2]['output'] must be a string or a non-empty list of strings"]),
    ("output-mixed-list", _edit("train", lambda o: o["Instances"][2].update(output=["a", 2])), None, "superni",
     SUPERNI_TASK, ["Instances[2]['output']"]),
    ("id-not-str", _edit("train", lambda o: o["Instances"][0].update(id=7)), None, "superni", SUPERNI_TASK,
     ["Instances[0]['id'] must be a string, got int"]),
]


@pytest.mark.parametrize(
    ("setup", "data_dir_of", "benchmark", "task", "fragments"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_one_clear_line(
    tree: Path,
    setup: Callable[[Path], None],
    data_dir_of: Callable[[Path], Path] | None,
    benchmark: str,
    task: str,
    fragments: list[str],
) -> None:
    setup(tree)
    data_dir = tree if data_dir_of is None else data_dir_of(tree)
    with pytest.raises(DataError) as raised:
        validate_tasks(data_dir, benchmark, [task])
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(DataError):  # load_task refuses the same input
        load_task(data_dir, benchmark, task)


def test_crafted_tree_is_valid(tree: Path) -> None:
    validate_tasks(tree, "superni", [SUPERNI_TASK])
    validate_tasks(tree, "long", [LONG_TASK], selection="paper")


def test_data_dir_from_environment(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAINLORA_DATA", str(tree))
    assert load_task(None, "long", LONG_TASK).name == LONG_TASK
    monkeypatch.delenv("GAINLORA_DATA")
    with pytest.raises(DataError, match="GAINLORA_DATA is not set.*make data"):
        validate_tasks(None, "long", [LONG_TASK])


def test_blank_long_definition_is_dropped(tree: Path) -> None:
    path = tree / "Long_Sequence" / LONG_TASK / "test.json"
    _write(path, {"Definition": [" \n"], "Instances": [{"input": "in", "output": ["o"]}]})
    assert load_task(tree, "long", LONG_TASK).test[0].source == "in\nOutput: "
    _write(path, {"Definition": ["Pick.\n"], "Instances": [{"input": "in", "output": "o"}]})
    assert load_task(tree, "long", LONG_TASK).test[0].source == "Pick.\nin\nOutput: "  # edited file is re-read


def test_a_byte_order_mark_is_read_past(tree: Path) -> None:
    """A task file saved by an editor that writes a UTF-8 BOM is read as the same JSON (it was refused
    as malformed, "decode using utf-8-sig")."""
    path = tree / "Long_Sequence" / LONG_TASK / "test.json"
    _write(path, "\ufeff" + json.dumps({"Definition": ["Pick.\n"], "Instances": [{"input": "in", "output": "o"}]}))
    assert load_task(tree, "long", LONG_TASK).test[0].source == "Pick.\nin\nOutput: "


def test_superni_definition_is_stripped(tree: Path) -> None:
    example = load_task(tree, "superni", SUPERNI_TASK).test[0]
    expected = "Definition: Answer the question.\n\nNow complete the following example -\nInput: qt\nOutput: "
    assert example.source == expected
    assert (example.target, example.references, example.id) == ("at", ("at",), "task1-t0")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"val_size": 0.0}, "must lie in (0, 1)"),
        ({"val_size": 1.0}, "must lie in (0, 1)"),
        ({"val_size": 0}, "at least 1"),
        ({"val_size": 10}, "leaves no training data"),
        ({"val_size": "x"}, "val_size must be"),
        ({"max_train": 0}, "max_train must be a positive integer"),
        ({"max_eval": -1}, "max_eval must be a positive integer"),
        ({"selection": "best"}, "unknown selection 'best'"),
    ],
)
def test_bad_arguments(tree: Path, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError) as raised:
        load_task(tree, "superni", SUPERNI_TASK, **kwargs)
    assert fragment in str(raised.value)


def test_small_val_size_keeps_one_val_example(tree: Path) -> None:
    task = load_task(tree, "superni", SUPERNI_TASK, val_size=0.01)
    assert (len(task.train), len(task.val)) == (9, 1)


def test_task_dir_layout(tmp_path: Path) -> None:
    assert task_dir(tmp_path, "long", "cb") == tmp_path / GROUPS["long"] / "cb"
    assert task_dir(tmp_path, "superni", "t") == tmp_path / "SuperNI" / "t"
    with pytest.raises(DataError, match="invalid task name"):
        task_dir(tmp_path, "long", "../cb")


# ------------------------------------------------------------------------------------- carving one file


def test_carve_splits_one_file_into_disjoint_parts(tree: Path) -> None:
    """A task carved from test.json alone (dbpedia in the shared copy has no train.json)."""
    (tree / "Long_Sequence" / LONG_TASK / "train.json").unlink()
    body = {"Definition": ["Pick.\n"], "Instances": [{"input": f"x{i}", "output": "yes"} for i in range(40)]}
    _write(tree / "Long_Sequence" / LONG_TASK / "test.json", body)
    validate_tasks(tree, "long", [LONG_TASK], carve={LONG_TASK: "test"})
    task = load_task(tree, "long", LONG_TASK, carve_from="test")
    ids = [[ex.id for ex in part] for part in (task.train, task.val, task.test)]
    assert [len(part) for part in ids] == [27, 3, 10]  # 25% test, then 10% of the rest for validation
    assert sorted(sum(ids, [])) == sorted(f"{LONG_TASK}-{i}" for i in range(40))  # disjoint, nothing lost
    assert any("carved from test.json alone" in note for note in task.notes)
    # The test part depends on the task alone: another seed validates on other instances, tests on the same.
    other = load_task(tree, "long", LONG_TASK, carve_from="test", seed=5)
    assert [ex.id for ex in other.test] == ids[2] and [ex.id for ex in other.val] != ids[1]
    assert len(load_task(tree, "long", LONG_TASK, carve_from="test", carve_test_size=0.5).test) == 20
    with pytest.raises(DataError, match="demo/train.json is missing"):  # without carve it needs train.json
        validate_tasks(tree, "long", [LONG_TASK])


@pytest.mark.parametrize(
    ("carve", "selection", "fragment"),
    [
        ({LONG_TASK: "dev"}, "carved", f"benchmark.carve.{LONG_TASK}=dev: one of train, test"),
        ({"other": "test"}, "carved", "benchmark.carve.other=test: other is not in the task stream"),
        ({LONG_TASK: "test"}, "paper", "needs benchmark.selection=carved"),
    ],
)
def test_bad_carve_is_one_clear_line(tree: Path, carve: dict, selection: str, fragment: str) -> None:
    with pytest.raises(DataError) as raised:
        validate_tasks(tree, "long", [LONG_TASK], selection=selection, carve=carve)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_carve_needs_three_instances_and_a_fraction(tree: Path) -> None:
    _write(tree / "Long_Sequence" / LONG_TASK / "train.json",
           {"Definition": [], "Instances": [{"input": "x", "output": "y"}] * 2})
    with pytest.raises(DataError, match="train.json: needs at least 3 instances to carve train, validation"):
        validate_tasks(tree, "long", [LONG_TASK], carve={LONG_TASK: "train"})
    with pytest.raises(DataError, match=r"carve_test_size=1.0: a fraction in \(0, 1\)"):
        load_task(tree, "long", LONG_TASK, carve_from="test", carve_test_size=1.0)


def test_stream_config_passes_carve_to_the_reader(tree: Path) -> None:
    from gainlora.data.tasks import load_stream

    cfg = {"reader": "long", "data_dir": str(tree), "tasks": [LONG_TASK], "carve": {LONG_TASK: "train"},
           "carve_test_size": 0.5}
    (task,) = load_stream(cfg, seed=0)
    assert (len(task.train) + len(task.val), len(task.test)) == (2, 2)  # from train.json's 4, not test.json
    assert all(ex.source.startswith("x") for ex in task.test)
    assert any("carved from train.json" in note for note in task.notes)
