"""The benchmark-text pre-training (gainlora.model.pretrain): the span-corruption objective, and that
the corpus is the train inputs only, never a label or a test file."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gainlora.data.types import DataError
from gainlora.model.pretrain import TextCorpus, corpus_texts, corrupt, resolve_text_spec, text_backbone_dir

SENTINELS = list(range(1000, 1032))
EOS = 1


def reconstruct(source: list[int], target: list[int]) -> list[int]:
    """Fill each sentinel of the source with the span the target gives it."""
    spans: dict[int, list[int]] = {}
    current = None
    for tok in target[:-1]:
        if tok in SENTINELS:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out: list[int] = []
    for tok in source[:-1]:
        out += spans[tok] if tok in SENTINELS else [tok]
    return out


@pytest.mark.parametrize("n", [4, 5, 17, 64])
@pytest.mark.parametrize("seed", range(5))
def test_corrupt_masks_spans_that_the_target_restores(n: int, seed: int) -> None:
    ids = list(range(100, 100 + n))
    source, target = corrupt(ids, random.Random(seed), 0.15, 3.0, SENTINELS, EOS)
    assert source[-1] == EOS and target[-1] == EOS
    assert reconstruct(source, target) == ids
    masked = len(target) - 1 - sum(t in SENTINELS for t in target)
    assert masked == max(1, round(n * 0.15))
    sentinels = [t for t in source if t in SENTINELS]
    assert sentinels == SENTINELS[: len(sentinels)]  # in order, each once
    assert all(a not in SENTINELS or b not in SENTINELS for a, b in zip(source, source[1:]))  # spans apart


def write_task(root: Path, task: str, inputs: list[str], label: str) -> None:
    folder = root / "Long_Sequence" / task
    folder.mkdir(parents=True)
    obj = {"Definition": ["Classify.\n"], "Instances": [{"input": t, "output": label} for t in inputs]}
    (folder / "train.json").write_text(json.dumps(obj))
    test = {**obj, "Instances": [{"input": "TESTONLY text", "output": label}]}
    (folder / "test.json").write_text(json.dumps(test))


def test_corpus_is_train_inputs_only(tmp_path: Path) -> None:
    write_task(tmp_path, "a", ["first text here", "second text"], "LABELA")
    write_task(tmp_path, "b", ["third one"], "LABELB")
    corpus = TextCorpus.from_config({"data_dir": str(tmp_path), "benchmark": "long", "tasks": ["a", "b"]})
    texts = corpus_texts(corpus)
    assert texts == ["first text here", "second text", "third one"]
    blob = " ".join(texts)
    assert "LABEL" not in blob and "TESTONLY" not in blob and "Classify" not in blob


def test_cache_name_follows_the_file_bytes_not_their_path(tmp_path: Path) -> None:
    for copy in ("x", "y"):
        write_task(tmp_path / copy, "a", ["some text"], "L")
    spec = resolve_text_spec("t5-text")
    name = {c: text_backbone_dir(spec, TextCorpus(str(tmp_path / c), "long", ("a",)), tmp_path).name
            for c in ("x", "y")}
    assert name["x"] == name["y"]
    write_task(tmp_path / "z", "a", ["other text"], "L")
    assert text_backbone_dir(spec, TextCorpus(str(tmp_path / "z"), "long", ("a",)), tmp_path).name != name["x"]


@pytest.mark.parametrize("config, match", [
    ({"benchmark": "long", "tasks": ["a"]}, r"text_corpus\.data_dir is not set"),
    ({"data_dir": "D", "benchmark": "long", "tasks": "a"}, r"text_corpus\.tasks='a': a list"),
    ({"data_dir": "D", "benchmark": "glue", "tasks": ["a"]}, r"text_corpus\.benchmark='glue'"),
])
def test_bad_corpus_config_names_the_key(config: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        TextCorpus.from_config(config)


def test_missing_train_file_and_bad_preset_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope/train\.json is missing"):
        TextCorpus(str(tmp_path), "long", ("nope",)).files()
    with pytest.raises(DataError, match=r"backbone\.tiny='t5-demo'"):
        resolve_text_spec("t5-demo")
    with pytest.raises(DataError, match=r"tiny_overrides\.layerz"):
        resolve_text_spec("t5-text", {"layerz": 3})


def test_lsa_puts_tokens_of_the_same_documents_together() -> None:
    from gainlora.model.pretrain import lsa_embeddings

    rng = random.Random(0)
    topics = [list(range(10, 20)), list(range(20, 30))]  # two topics, ten tokens each; 5-9 occur everywhere
    docs = [rng.sample(topics[d % 2], 4) + rng.sample(range(5, 10), 3) for d in range(200)]
    vectors, seen = lsa_embeddings(docs, 40, 4, seed=0)
    assert seen.tolist() == [5 <= i < 30 for i in range(40)]
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)
    same = (unit[10:20] @ unit[10:20].T).mean()
    across = (unit[10:20] @ unit[20:30].T).mean()
    assert same > 0.5 and across < 0
    assert torch.allclose(vectors[seen].norm(dim=1), torch.full((25,), 2.0))  # sqrt(dim): T5's init scale
