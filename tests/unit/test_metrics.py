"""Scorers, the per-task torchmetrics accumulator and the AP/FT/BWT/FWT formulas.

Expected values are computed by hand in the comments, not by re-running the implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from gainlora.metrics import (
    SCORERS,
    TaskScores,
    cl_metrics,
    exact_match,
    lower_triangle,
    normalize_answer,
    rouge_l,
    score,
)

# --------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_from_lcs() -> None:
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)


def test_rouge_l_non_contiguous_lcs() -> None:
    # pred "a x b y c" vs ref "a b c": LCS = a b c = 3; P = 3/5, R = 1, F = 2*0.6/1.6 = 0.75.
    assert rouge_l("a x b y c", ["a b c"]) == pytest.approx(75.0)


def test_rouge_l_uses_stemming_and_case_folding() -> None:
    # Porter stemming maps cats -> cat and running -> run; rouge-score lowercases and drops "!".
    assert rouge_l("Cats running!", ["cat run"]) == pytest.approx(100.0)
    assert rouge_l("dog", ["cat"]) == 0.0


def test_rouge_l_takes_max_over_references() -> None:
    refs = ["completely different words", "the cat sat on the mat", "the cat sat"]
    assert rouge_l("the cat sat", refs) == pytest.approx(100.0)
    assert rouge_l("the cat sat", refs[:2]) == pytest.approx(200 / 3)


def test_rouge_l_empty_prediction_scores_zero() -> None:
    assert rouge_l("", ["anything"]) == 0.0


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Answer.", "the answer"),
        ("  yes!\n", "yes"),
        ("don't", "dont"),
        ("a,b;c", "abc"),
        ("New\tYork   City", "new york city"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_cases() -> None:
    assert exact_match("The answer.", ["the answer"]) == 100.0
    assert exact_match("positive", ["Positive"]) == 100.0
    assert exact_match("positive", ["negative"]) == 0.0
    # Articles are kept (unlike SQuAD's normalization) and a partial answer is not a match.
    assert exact_match("answer", ["the answer"]) == 0.0
    assert exact_match("the answer is yes", ["yes"]) == 0.0
    # Only ASCII punctuation is removed: a typographic apostrophe stays.
    assert exact_match("don\u2019t", ["dont"]) == 0.0


def test_exact_match_takes_max_over_references() -> None:
    assert exact_match("B", ["A", "b", "C"]) == 100.0
    assert exact_match("D", ["A", "b", "C"]) == 0.0


def test_scorer_registry_and_dispatch() -> None:
    assert set(SCORERS) == {"rougeL", "exact_match"}
    assert score("x", ["X."], "exact_match") == 100.0
    assert score("the cat sat", ["the cat sat on the mat"], "rougeL") == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("x", ["x"], "bleu")


@pytest.mark.parametrize("scorer", [rouge_l, exact_match])
def test_scorers_reject_bad_references(scorer) -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        scorer("x", [])
    with pytest.raises(TypeError, match="not a single string"):
        scorer("x", "x")


# --------------------------------------------------------------------------- TaskScores


def test_task_scores_accumulates_across_updates_and_resets() -> None:
    metric = TaskScores(num_tasks=3)
    metric.update(["a", "b"], [["a"], ["c"]], [0, 0], "exact_match")  # task 0: 100, 0
    metric.update(["the cat sat"], [["the cat sat on the mat"]], torch.tensor([2]), ["rougeL"])
    metric.update(["A."], [["a"]], [0], ["exact_match"])  # task 0: 100
    out = metric.compute()
    assert out.dtype == torch.float64
    assert out[0].item() == pytest.approx(200 / 3)  # (100 + 0 + 100) / 3
    assert math.isnan(out[1].item())  # never evaluated
    assert out[2].item() == pytest.approx(200 / 3)
    assert metric.count.tolist() == [3, 0, 1]

    metric.reset()
    assert metric.count.tolist() == [0, 0, 0]
    with pytest.warns(UserWarning, match="called before the"):  # torchmetrics' own notice
        assert torch.isnan(metric.compute()).all()
    metric.update(["z"], [["z"]], [1], "exact_match")
    assert metric.compute()[1].item() == 100.0


def test_task_scores_mixed_metrics_in_one_batch() -> None:
    metric = TaskScores(num_tasks=2)
    metric.update(
        ["the cat sat", "yes", "no"],
        [["the cat sat on the mat"], ["Yes"], ["yes"]],
        [0, 1, 1],
        ["rougeL", "exact_match", "exact_match"],
    )
    out = metric.compute()
    assert out[0].item() == pytest.approx(200 / 3)
    assert out[1].item() == pytest.approx(50.0)


def test_task_scores_states_merge_by_sum() -> None:
    # What DDP does at compute(): the shards' states are summed. Averaging per-shard means
    # instead would give (100 + 0) / 2 = 50 for task 0 here, not 100/3.
    whole, shard_a, shard_b = TaskScores(2), TaskScores(2), TaskScores(2)
    preds, refs, ids = ["a", "b", "c", "d"], [["a"], ["x"], ["x"], ["d"]], [0, 0, 0, 1]
    whole.update(preds, refs, ids, "exact_match")
    shard_a.update(preds[:1], refs[:1], ids[:1], "exact_match")  # task 0: 100 (1 example)
    shard_b.update(preds[1:], refs[1:], ids[1:], "exact_match")  # task 0: 0, 0; task 1: 100
    shard_a.merge_state(shard_b)
    assert shard_a.compute()[0].item() == pytest.approx(100 / 3)
    assert torch.equal(shard_a.compute(), whole.compute())


def test_task_scores_validates_inputs() -> None:
    metric = TaskScores(num_tasks=2)
    with pytest.raises(ValueError, match="length mismatch"):
        metric.update(["a", "b"], [["a"]], [0, 0], "exact_match")
    with pytest.raises(ValueError, match="length mismatch"):
        metric.update(["a"], [["a"]], [0], ["exact_match", "rougeL"])
    with pytest.raises(ValueError, match="task id 2 out of range"):
        metric.update(["a"], [["a"]], [2], "exact_match")
    with pytest.raises(ValueError, match="unknown metric"):
        metric.update(["a"], [["a"]], [0], "accuracy")
    with pytest.raises(ValueError, match="num_tasks"):
        TaskScores(num_tasks=0)


# --------------------------------------------------------------------------- CL metrics

# R[t][j]: task 0 peaks after task 1 (80), not on the diagonal (60), so FT differs from -BWT.
R3 = [
    [60.0],
    [80.0, 90.0],
    [70.0, 50.0, 85.0],
]


def test_cl_metrics_3x3_by_hand() -> None:
    m = cl_metrics(R3)
    assert m["AP"] == pytest.approx((70 + 50 + 85) / 3)
    # FT: task 0 -> max(60, 80) - 70 = 10; task 1 -> 90 - 50 = 40; mean 25.
    # (Using only the diagonal would give ((60-70) + (90-50)) / 2 = 15.)
    assert m["FT"] == pytest.approx(25.0)
    # BWT: ((70 - 60) + (50 - 90)) / 2 = -15; reference script divides by T = 3 tasks: -30/3 = -10.
    assert m["BWT"] == pytest.approx(-15.0)
    assert m["BWT_ref"] == pytest.approx(-10.0)
    assert m["FWT_diag"] == pytest.approx((60 + 90 + 85) / 3)
    assert m["FWT"] is None


def test_cl_metrics_forward_transfer_with_single_task_scores() -> None:
    # ((60 - 70) + (90 - 95) + (85 - 80)) / 3 = -10/3
    assert cl_metrics(R3, single_task=[70, 95, 80])["FWT"] == pytest.approx(-10 / 3)
    with pytest.raises(ValueError, match="single_task has 2 scores"):
        cl_metrics(R3, single_task=[70, 95])


def test_cl_metrics_4x4_reference_bwt_convention() -> None:
    r = [
        [50.0],
        [40.0, 80.0],
        [30.0, 70.0, 60.0],
        [20.0, 60.0, 60.0, 90.0],
    ]
    m = cl_metrics(r)
    # drops vs diagonal: 20-50, 60-80, 60-60 -> -30, -20, 0; sum -50.
    assert m["BWT"] == pytest.approx(-50 / 3)
    assert m["BWT_ref"] == pytest.approx(-50 / 4)
    # FT: task0 max(50,40,30) - 20 = 30; task1 max(80,70) - 60 = 20; task2 60 - 60 = 0.
    assert m["FT"] == pytest.approx(50 / 3)
    assert m["AP"] == pytest.approx(230 / 4)


def test_cl_metrics_accepts_square_matrix_with_none() -> None:
    square = [
        [60.0, None, None],
        [80.0, 90.0, None],
        [70.0, 50.0, 85.0],
    ]
    assert cl_metrics(square) == cl_metrics(R3)


def test_cl_metrics_partial_matrix_uses_last_row() -> None:
    # After 2 of 3 tasks (padded to the full width): T = 1.
    m = cl_metrics([[60.0, None, None], [80.0, 90.0, None]])
    assert m["AP"] == pytest.approx(85.0)
    assert m["FT"] == pytest.approx(60.0 - 80.0)  # improved: negative forgetting
    assert m["BWT"] == pytest.approx(20.0)
    assert m["BWT_ref"] == pytest.approx(10.0)
    assert m["FWT_diag"] == pytest.approx(75.0)
    assert cl_metrics(R3[:2]) == m


def test_cl_metrics_single_task_has_zero_forgetting() -> None:
    m = cl_metrics([[42.0]], single_task=[40.0, 99.0])
    assert m == {"AP": 42.0, "FT": 0.0, "BWT": 0.0, "BWT_ref": 0.0, "FWT": 2.0, "FWT_diag": 42.0}


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([], "no rows"),
        ([[50.0, 10.0]], r"matrix\[0\]\[1\] = 10.0 is above the diagonal"),
        ([[50.0], [None, 60.0]], r"matrix\[1\]\[0\] = None"),
        ([[50.0], [40.0]], "row 1 has 1 entries; at least 2"),
        ([[float("nan")]], "finite score"),
        ([[True]], "finite score"),
        ([["50"]], "finite score"),
    ],
)
def test_cl_metrics_rejects_bad_matrices(matrix, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cl_metrics(matrix)


def test_lower_triangle_drops_padding() -> None:
    assert lower_triangle([[1, None], [2, 3]]) == [[1.0], [2.0, 3.0]]
