"""Scoring of generated answers and continual-learning metrics over the accuracy matrix.

``R[t][j]`` is the score (0-100) on task ``j`` after learning task ``t`` (0-indexed, ``j <= t``).
Formulas: see :func:`cl_metrics`; which apply to which kind of run: :mod:`gainlora.run_kinds`.
"""
from __future__ import annotations

import functools
import math
import numbers
import string
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "SCORERS",
    "average_curve",
    "TaskScores",
    "cl_metrics",
    "exact_match",
    "joint_row",
    "lower_triangle",
    "normalize_answer",
    "rouge_l",
    "score",
]

# Built on first use: constructing it loads nltk's Porter stemmer, which the many callers that
# only need exact match or the matrix metrics should not pay for at import.
_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def _check_references(references: Sequence[str]) -> None:
    # A bare string is a Sequence[str] too; scoring it character by character would be silently wrong.
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("at least one reference is needed to score a prediction")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x 100 (rouge-score, Porter stemming), max over references."""
    _check_references(references)
    scorer = _rouge_scorer()
    # rouge-score's argument order is (target, prediction).
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100.0


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse runs of whitespace (and strip)."""
    return " ".join(s.lower().translate(_PUNCTUATION_TABLE).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalized prediction equals any normalized reference, else 0.0."""
    _check_references(references)
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in references) else 0.0


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "rougeL": rouge_l,
    "exact_match": exact_match,
}


def score(prediction: str, references: Sequence[str], metric: str) -> float:
    """Score one prediction with the named metric (a key of :data:`SCORERS`)."""
    try:
        scorer = SCORERS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(SCORERS)}") from None
    return scorer(prediction, references)


class TaskScores(Metric):
    """Per-task mean score over generated predictions, summed across processes under DDP.

    Each example carries its task id and metric name, so one evaluation loader can mix all seen
    tasks (needed under ZeRO-3, where several eval loaders break). Scoring happens on the host in
    Python; only the per-task sums and counts live in the tensor states that get all-reduced.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    total: Tensor
    count: Tensor

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        # float64: sums of thousands of scores in [0, 100] must not lose precision.
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: list[str],
        references: list[Sequence[str]],
        task_ids: list[int] | Tensor,
        metrics: list[str] | str,
    ) -> None:
        n = len(predictions)
        ids = task_ids.tolist() if isinstance(task_ids, Tensor) else list(task_ids)
        names = [metrics] * n if isinstance(metrics, str) else list(metrics)
        if not (len(references) == len(ids) == len(names) == n):
            raise ValueError(
                f"length mismatch: {n} predictions, {len(references)} references, "
                f"{len(ids)} task ids, {len(names)} metrics"
            )
        for t in ids:
            if not 0 <= t < self.num_tasks:
                raise ValueError(f"task id {t} out of range [0, {self.num_tasks})")
        values = [score(p, refs, m) for p, refs, m in zip(predictions, references, names)]
        index = torch.tensor(ids, dtype=torch.long, device=self.total.device)
        # The state's own dtype: wrappers that cast the whole module (DeepSpeed) cast states too.
        self.total.index_add_(0, index, torch.tensor(values, dtype=self.total.dtype, device=self.total.device))
        self.count.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> Tensor:
        """Mean score per task (float64), nan for tasks that got no example."""
        nan = torch.full_like(self.total, float("nan"))
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), nan)

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics squeezes a one-element result to 0-dim; one score per task must stay a vector
        # when the stream has a single task.
        wrapped = super()._wrap_compute(compute)
        return functools.wraps(compute)(lambda *args, **kwargs: wrapped(*args, **kwargs).reshape(self.num_tasks))


def _is_finite_number(value: object) -> bool:
    # bool is an int subclass; True as a score is a bug upstream, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def lower_triangle(matrix: Sequence[Sequence[float | None]]) -> list[list[float]]:
    """Validated lower triangle of ``matrix`` as floats; row ``t`` keeps entries ``0..t``.

    Accepts ragged lower-triangular rows (row ``t`` of length ``t + 1``) or padded rows (any longer
    width) whose entries above the diagonal are None, and any number of rows (a partial run).
    """
    if len(matrix) == 0:
        raise ValueError("matrix has no rows")
    rows: list[list[float]] = []
    for t, row in enumerate(matrix):
        if len(row) < t + 1:
            raise ValueError(f"matrix row {t} has {len(row)} entries; at least {t + 1} needed (j <= t)")
        for j, value in enumerate(row):
            if j > t:
                if value is not None:
                    raise ValueError(
                        f"matrix[{t}][{j}] = {value!r} is above the diagonal (task {j} not yet "
                        f"learned after task {t}); it must be None"
                    )
            elif not _is_finite_number(value):
                raise ValueError(f"matrix[{t}][{j}] = {value!r}; a finite score is needed for j <= t")
        rows.append([float(v) for v in row[: t + 1]])
    return rows


def average_curve(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """Average score over the seen tasks after each task (the AP "so far")."""
    return [sum(row) / len(row) for row in lower_triangle(matrix)]


def cl_metrics(
    matrix: Sequence[Sequence[float | None]],
    single_task: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """Continual-learning metrics from the accuracy matrix, on its last available row.

    With ``T`` the index of the last row (0-based; ``T + 1`` tasks learned so far):

    - ``AP``  = mean_{j<=T} R[T][j]
    - ``FT``  = mean_{j<T} (max_{j<=k<T} R[k][j] - R[T][j])  (best earlier score minus final)
    - ``BWT`` = mean_{j<T} (R[T][j] - R[j][j])
    - ``BWT_ref`` = sum_{j<T} (R[T][j] - R[j][j]) / (T + 1)  (the reference script divides by the
      number of tasks, the last included)
    - ``FWT_diag`` = mean_{j<=T} R[j][j]
    - ``FWT`` = mean_{j<=T} (R[j][j] - S[j]) with single-task scores ``S``, else None.

    With a single task learned there is nothing to forget: FT, BWT and BWT_ref are 0.0.
    A partial matrix (fewer rows than tasks) yields the metrics "so far".
    """
    rows = lower_triangle(matrix)
    T = len(rows) - 1
    last = rows[T]
    diag = [rows[j][j] for j in range(T + 1)]

    ap = sum(last) / (T + 1)
    if T == 0:
        ft = bwt = bwt_ref = 0.0
    else:
        ft = sum(max(rows[k][j] for k in range(j, T)) - last[j] for j in range(T)) / T
        drop = sum(last[j] - diag[j] for j in range(T))
        bwt = drop / T
        bwt_ref = drop / (T + 1)

    fwt: float | None = None
    if single_task is not None:
        if len(single_task) < T + 1:
            raise ValueError(
                f"single_task has {len(single_task)} scores but the matrix covers {T + 1} tasks"
            )
        fwt = sum(diag[j] - float(single_task[j]) for j in range(T + 1)) / (T + 1)

    return {
        "AP": ap,
        "FT": ft,
        "BWT": bwt,
        "BWT_ref": bwt_ref,
        "FWT": fwt,
        "FWT_diag": sum(diag) / (T + 1),
    }


def joint_row(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """The single row of a multi-task run's matrix, validated: a finite score for every task."""
    if len(matrix) != 1:
        raise ValueError(f"a multi-task matrix has exactly one row (one joint fit), got {len(matrix)}")
    row = matrix[0]
    if len(row) == 0:
        raise ValueError("the multi-task row is empty")
    for j, value in enumerate(row):
        if not _is_finite_number(value):
            raise ValueError(f"matrix[0][{j}] = {value!r}; a multi-task run scores every task")
    return [float(v) for v in row]
