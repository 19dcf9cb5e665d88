"""The embedded demo benchmark: five small instruction tasks generated on the fly (seeded, no download).

Each task has its own instruction and its own pool of filler pseudo-words, so inputs differ by task
(which is what GainLoRA's gates must pick up), and every answer is a single word from a small label
set. The tiny tokenizer (``gainlora.model.tiny``) is trained so that each answer word is one token;
an answer is then one token plus EOS, which a frozen tiny T5 with LoRA learns in a few hundred steps.

Prompts follow the SuperNI shape used for the real benchmark (docs/method.md), so the same collators and
metrics serve the demo and the paper's data.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from gainlora.data.types import DataError, Example, TaskData

__all__ = [
    "DEMO_TASKS",
    "PROMPT_PIECES",
    "demo_vocabulary",
    "make_demo_task",
    "pseudo_word_universe",
    "render_prompt",
    "task_instruction",
    "task_labels",
    "task_pool",
]


# The fixed pieces of the SuperNI prompt (docs/method.md, 'Data and prompts'). The tiny tokenizer makes
# each one a single token, which keeps demo sequences short. The first two leave their trailing space
# to the text that follows (a byte-level "Ġword" token, so decoding is exact); the last keeps it, so a
# prompt ends on that token whether or not the answer is tokenized together with it.
PROMPT_PIECES: tuple[str, ...] = (
    "Definition:",
    "\n\nNow complete the following example -\nInput:",
    "\nOutput: ",
)


def render_prompt(instruction: str, text: str) -> str:
    """The SuperNI prompt: ``PROMPT_PIECES`` around the instruction and the input."""
    head, middle, tail = PROMPT_PIECES
    return f"{head} {instruction.strip()}{middle} {text}{tail}"


# --- pseudo-words ---------------------------------------------------------------------------------
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FINAL_VOWELS = "aiou"  # no final "e": most CVCe strings are English words (bike, live, make)
# Pseudo-words that happen to be English (or look like the labels) would blur the task pools.
_AVOIDED = frozenset(
    "papa mama lama tuna soda sofa gala kilo lava diva tofu puma toga nova zeta beta data mega meta solo "
    "polo logo memo demo limo dodo judo kudo sumo tutu taro kava soma sepia pita pizza tiki koda vida "
    "mini mafia gamma sigma tapa tiara lira visa vita vino veto bingo sago silo sari samba toro tuba "
    "mango pasta".split()
)


@lru_cache(maxsize=1)
def pseudo_word_universe() -> tuple[str, ...]:
    """Consonant-vowel-consonant-vowel pseudo-words (kalo, tibu, ...) in a fixed shuffled order.

    The demo takes its pools from the front of this list; the tiny backbone's pre-training takes
    words after the demo's (see ``gainlora.model.tiny``), so the two never share a word.
    """
    words = [
        c1 + v1 + c2 + v2
        for c1 in _CONSONANTS
        for v1 in _VOWELS
        for c2 in _CONSONANTS
        for v2 in _FINAL_VOWELS
        if c1 != c2 and (c1 + v1 + c2 + v2) not in _AVOIDED
    ]
    random.Random(20240611).shuffle(words)
    return tuple(words)


_POOL_SIZES = {  # filler words per task; demo_lastword's pool is also its answer set
    "demo_colour": 120,
    "demo_parity": 120,
    "demo_lastword": 200,
    "demo_continent": 120,
    "demo_sentiment": 120,
}


@lru_cache(maxsize=1)
def _pools() -> dict[str, tuple[str, ...]]:
    universe = pseudo_word_universe()
    pools: dict[str, tuple[str, ...]] = {}
    start = 0
    for name, size in _POOL_SIZES.items():
        pools[name] = universe[start : start + size]
        start += size
    return pools


# --- real words -----------------------------------------------------------------------------------
_COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple",
    "pink", "brown", "black", "white", "grey", "silver",
)
_UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
# Single-word names only: each is one token, so the task is a clean lookup for a frozen model.
# Six per continent: with eight, one LoRA initialisation in three stopped at 85% after 400 steps.
_COUNTRIES = {
    "Africa": ("Kenya", "Nigeria", "Egypt", "Ghana", "Ethiopia", "Morocco"),
    "Asia": ("Japan", "China", "India", "Vietnam", "Thailand", "Nepal"),
    "Europe": ("France", "Germany", "Spain", "Italy", "Poland", "Norway"),
    "Americas": ("Brazil", "Canada", "Mexico", "Peru", "Chile", "Argentina"),
    "Oceania": ("Australia", "Fiji", "Samoa", "Tonga", "Vanuatu", "Palau"),
}
_POSITIVE = (
    "great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "charming",
    "pleasant", "fantastic", "splendid", "perfect",
)
_NEGATIVE = (
    "awful", "terrible", "boring", "dreadful", "horrible", "dull", "poor", "annoying", "clumsy",
    "tedious", "mediocre", "broken",
)


def _number_word(n: int) -> str:
    if n < 20:
        return _UNITS[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens - 2] + ("" if unit == 0 else "-" + _UNITS[unit])


# --- tasks ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    instruction: str
    labels: tuple[str, ...]
    sample: Callable[[random.Random, tuple[str, ...]], tuple[str, str]]  # (rng, pool) -> (input, answer)
    extra_words: tuple[str, ...] = ()  # real words the inputs use besides the pool and the labels
    # (each one token of the tiny tokenizer; number words are joined by hyphens)


def _fillers(rng: random.Random, pool: Sequence[str], low: int, high: int) -> list[str]:
    return [rng.choice(pool) for _ in range(rng.randint(low, high))]


def _insert(rng: random.Random, words: list[str], item: str) -> str:
    words.insert(rng.randint(0, len(words)), item)
    return " ".join(words)


def _colour(rng: random.Random, pool: tuple[str, ...]) -> tuple[str, str]:
    colour = rng.choice(_COLOURS)
    return _insert(rng, _fillers(rng, pool, 3, 6), colour), colour


def _parity(rng: random.Random, pool: tuple[str, ...]) -> tuple[str, str]:
    n = rng.randrange(100)
    return _insert(rng, _fillers(rng, pool, 3, 6), _number_word(n)), ("even", "odd")[n % 2]


def _lastword(rng: random.Random, pool: tuple[str, ...]) -> tuple[str, str]:
    words = _fillers(rng, pool, 4, 7)
    return " ".join(words), words[-1]


def _continent(rng: random.Random, pool: tuple[str, ...]) -> tuple[str, str]:
    continent = rng.choice(sorted(_COUNTRIES))
    country = rng.choice(_COUNTRIES[continent])
    return _insert(rng, _fillers(rng, pool, 3, 6), country), continent


def _sentiment(rng: random.Random, pool: tuple[str, ...]) -> tuple[str, str]:
    label = rng.choice(("positive", "negative"))
    words = _fillers(rng, pool, 2, 5)
    # two opinion words of one polarity: one alone left the task at 93.5% in 400 steps
    for adjective in rng.sample(_POSITIVE if label == "positive" else _NEGATIVE, 2):
        words.insert(rng.randint(0, len(words)), adjective)
    return " ".join(words), label


_TASKS: dict[str, _Task] = {
    "demo_colour": _Task(
        "Which colour is named in the text?",
        _COLOURS,
        _colour,
    ),
    "demo_parity": _Task(
        "Is the spelled-out number even or odd?",
        ("even", "odd"),
        _parity,
        extra_words=_UNITS + _TENS,
    ),
    "demo_lastword": _Task(
        "Copy the last word of the list.",
        _pools()["demo_lastword"],
        _lastword,
    ),
    "demo_continent": _Task(
        "Which continent is the country in: Africa, Asia, Europe, Americas or Oceania?",
        tuple(sorted(_COUNTRIES)),
        _continent,
        extra_words=tuple(c for cs in _COUNTRIES.values() for c in cs),
    ),
    "demo_sentiment": _Task(
        "How did the customer feel about the product?",
        ("positive", "negative"),
        _sentiment,
        extra_words=_POSITIVE + _NEGATIVE,
    ),
}

# Default order: the A -> E sequence of docs/demo_findings.md.
DEMO_TASKS: tuple[str, ...] = (
    "demo_colour",
    "demo_parity",
    "demo_lastword",
    "demo_continent",
    "demo_sentiment",
)


def _task(name: str) -> _Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise DataError(f"unknown demo task {name!r}; valid names: {', '.join(DEMO_TASKS)}") from None


def task_labels(name: str) -> tuple[str, ...]:
    """Every answer the task can have (each one token of the tiny tokenizer)."""
    return _task(name).labels


def task_instruction(name: str) -> str:
    return _task(name).instruction


def task_pool(name: str) -> tuple[str, ...]:
    """The task's filler pseudo-words (disjoint across tasks)."""
    _task(name)
    return _pools()[name]


def demo_vocabulary() -> dict[str, tuple[str, ...]]:
    """What the tiny tokenizer must cover: ``answers`` (every label) and ``words`` (every word an
    input is made of) are each one token; ``texts`` are other text the inputs use (instructions)."""
    answers = sorted({label for t in _TASKS.values() for label in t.labels})
    words = sorted({w for name, t in _TASKS.items() for w in (*_pools()[name], *t.extra_words)})
    # hyphenated numbers, so that "two" in "forty-two" (no leading space) is learnt as one token too
    numbers = " ".join(_number_word(n) for n in range(100))
    texts = [*(render_prompt(t.instruction, "") for t in _TASKS.values()), numbers]
    return {"answers": tuple(answers), "words": tuple(words), "texts": tuple(texts)}


def make_demo_task(
    name: str, *, seed: int = 0, n_train: int = 800, n_val: int = 100, n_test: int = 200
) -> TaskData:
    """Generate one demo task. Deterministic for ``(name, seed)``; splits share no input."""
    task = _task(name)
    if min(n_train, n_val, n_test) < 0:
        raise DataError(f"{name}: split sizes must be >= 0, got {n_train}/{n_val}/{n_test}")
    total = n_train + n_val + n_test
    rng = random.Random(f"{name}:{seed}")  # str seeds are hashed with sha512: stable across runs
    pool = _pools()[name]
    seen: set[str] = set()
    drawn: list[tuple[str, str]] = []
    attempts = 0
    while len(drawn) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise DataError(f"{name}: cannot draw {total} distinct examples")
        text, answer = task.sample(rng, pool)
        if text in seen:
            continue
        seen.add(text)
        drawn.append((text, answer))

    def split(part: str, rows: list[tuple[str, str]]) -> list[Example]:
        return [
            Example(
                source=render_prompt(task.instruction, text),
                target=answer,
                references=(answer,),
                id=f"{name}-{part}-{i}",
            )
            for i, (text, answer) in enumerate(rows)
        ]

    return TaskData(
        name=name,
        metric="exact_match",
        train=split("train", drawn[:n_train]),
        val=split("val", drawn[n_train : n_train + n_val]),
        test=split("test", drawn[n_train + n_val :]),
        notes=[f"synthetic demo task, seed={seed}"],
    )
