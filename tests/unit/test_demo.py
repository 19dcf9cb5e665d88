"""The embedded demo benchmark: deterministic, disjoint splits, distinct tasks, correct answers."""
from __future__ import annotations

import pytest

from gainlora.data.demo import (
    DEMO_TASKS,
    PROMPT_PIECES,
    demo_vocabulary,
    make_demo_task,
    render_prompt,
    task_instruction,
    task_labels,
    task_pool,
)
from gainlora.data.types import DataError, TaskData


def _input(source: str) -> str:
    return source.split(PROMPT_PIECES[1] + " ", 1)[1].removesuffix(PROMPT_PIECES[2])


_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())}


def _parse_number(word: str) -> int:
    head, _, unit = word.partition("-")
    if head in _TENS:
        return _TENS[head] + (_UNITS.index(unit) if unit else 0)
    return _UNITS.index(word)


def test_default_order_has_five_distinct_tasks() -> None:
    assert len(DEMO_TASKS) == 5 and len(set(DEMO_TASKS)) == 5


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_task_shape(name: str) -> None:
    data = make_demo_task(name, n_train=50, n_val=10, n_test=20)
    assert isinstance(data, TaskData) and data.name == name and data.metric == "exact_match"
    assert (len(data.train), len(data.val), len(data.test)) == (50, 10, 20)
    labels = set(task_labels(name))
    for ex in data.train + data.val + data.test:
        assert ex.target in labels and ex.references == (ex.target,)
        assert ex.source == render_prompt(task_instruction(name), _input(ex.source))
        assert ex.source.startswith("Definition: ")
        assert ex.source.endswith("\nOutput: ")
        assert "\n\nNow complete the following example -\nInput: " in ex.source
    assert len({ex.id for ex in data.train + data.val + data.test}) == 80
    assert len({ex.target for ex in data.train}) >= 2  # not a constant answer


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_deterministic_per_seed(name: str) -> None:
    a = make_demo_task(name, seed=3, n_train=40, n_val=5, n_test=10)
    b = make_demo_task(name, seed=3, n_train=40, n_val=5, n_test=10)
    c = make_demo_task(name, seed=4, n_train=40, n_val=5, n_test=10)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert [e.source for e in a.train] != [e.source for e in c.train]


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_splits_disjoint(name: str) -> None:
    data = make_demo_task(name)  # the default sizes the demo runs with
    train, val, test = ({e.source for e in split} for split in (data.train, data.val, data.test))
    assert len(train) == 800 and len(val) == 100 and len(test) == 200
    assert not (train & val) and not (train & test) and not (val & test)


def test_tasks_differ_in_instruction_and_vocabulary() -> None:
    instructions = [task_instruction(n) for n in DEMO_TASKS]
    assert len(set(instructions)) == len(DEMO_TASKS)
    pools = [set(task_pool(n)) for n in DEMO_TASKS]
    for i in range(len(pools)):
        assert len(pools[i]) >= 100
        for j in range(i + 1, len(pools)):
            assert not pools[i] & pools[j], (DEMO_TASKS[i], DEMO_TASKS[j])
    # every input uses its own task's pseudo-words only
    for name, pool in zip(DEMO_TASKS, pools):
        others = set().union(*(p for p in pools if p is not pool))
        for ex in make_demo_task(name, n_train=100, n_val=0, n_test=0).train:
            words = set(_input(ex.source).replace("-", " ").split())
            assert words & pool and not words & others


def test_answers_are_correct() -> None:
    for ex in make_demo_task("demo_colour", n_train=100, n_val=0, n_test=0).train:
        assert ex.target in _input(ex.source).split()
    for ex in make_demo_task("demo_lastword", n_train=100, n_val=0, n_test=0).train:
        assert ex.target == _input(ex.source).split()[-1]
    for ex in make_demo_task("demo_parity", n_train=100, n_val=0, n_test=0).train:
        number = next(w for w in _input(ex.source).split() if w not in task_pool("demo_parity"))
        assert ex.target == ("even", "odd")[_parse_number(number) % 2], ex.source
    for ex in make_demo_task("demo_continent", n_train=100, n_val=0, n_test=0).train:
        if "Kenya" in ex.source:
            assert ex.target == "Africa"
        if "Japan" in ex.source:
            assert ex.target == "Asia"


def test_vocabulary_covers_every_answer() -> None:
    vocab = demo_vocabulary()
    for name in DEMO_TASKS:
        assert set(task_labels(name)) <= set(vocab["answers"])
        assert set(task_pool(name)) <= set(vocab["words"])


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(DataError) as err:
        make_demo_task("demo_nope")
    for name in DEMO_TASKS:
        assert name in str(err.value)
