"""GPM memories (docs/method.md, "Memory update"), on covariances whose spectrum is known by construction."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gainlora.memory import CovarianceAccumulator, Subspace, threshold_at

DIM = 10


def orthonormal(dim: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return q


def covariance(directions: Tensor, values: list[float]) -> Tensor:
    """Q diag(values) Q^T: singular values ``values`` along the columns of Q."""
    return directions @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ directions.T


def projector(basis: Tensor) -> Tensor:
    return basis @ basis.T


def assert_orthonormal(basis: Tensor) -> None:
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)


# Singular values 4, 2, 1, 1 (squares 16, 4, 1, 1; total 22): cumulative shares 16/22, 20/22, 21/22, 1.
VALUES = [4.0, 2.0, 1.0, 1.0]
SHARES = [16 / 22, 20 / 22, 21 / 22, 1.0]


@pytest.mark.parametrize(("threshold", "kept"), [
    (0.1, 1),                  # at least one column
    (SHARES[1] - 1e-9, 1),     # the column whose share crosses the threshold is not kept
    (SHARES[1] + 1e-9, 2),
    (SHARES[2] - 1e-9, 2),
    (SHARES[2] + 1e-9, 3),
    (1.0, 3),                  # a share of exactly 1 is never below the threshold
])
def test_first_task_keeps_leading_columns_while_share_below_threshold(threshold: float, kept: int) -> None:
    Q = orthonormal(DIM, 4, seed=0)
    memory = Subspace(DIM)
    assert memory.update(covariance(Q, VALUES), threshold) == kept
    assert memory.rank == kept
    assert_orthonormal(memory.basis)
    if kept <= 2:  # distinct leading singular values: the exact directions are known
        torch.testing.assert_close(projector(memory.basis), projector(Q[:, :kept]), rtol=0, atol=1e-10)
    else:  # the last two share a singular value: only the span is defined
        assert (projector(Q) @ memory.basis - memory.basis).abs().max() < 1e-10


def test_later_task_starts_from_the_captured_share() -> None:
    """C2 = M diag(3) M^T + P diag(2, 1, 1/2) P^T with P orthogonal to the memory M (one column).
    total = 9 + 4 + 1 + 1/4 = 14.25; captured = 9 / 14.25; residual shares 4, 1, 1/4 over 14.25.
    Columns are appended while captured < eps, each adding its share (the crossing one included)."""
    Q = orthonormal(DIM, 4, seed=1)
    M, P = Q[:, :1], Q[:, 1:]
    cov2 = covariance(M, [3.0]) + covariance(P, [2.0, 1.0, 0.5])
    total = 14.25
    captured = [9 / total, 13 / total, 14 / total, 1.0]
    cases = [(captured[0] - 1e-9, 0), (captured[0] + 1e-9, 1), (captured[1] - 1e-9, 1), (captured[1] + 1e-9, 2),
             (captured[2] + 1e-9, 3)]
    for threshold, added in cases:
        memory = Subspace(DIM)
        memory.update(covariance(M, [5.0]), 0.5)
        torch.testing.assert_close(projector(memory.basis), projector(M), rtol=0, atol=1e-12)
        assert memory.update(cov2, threshold) == added, threshold
        assert memory.rank == 1 + added
        assert_orthonormal(memory.basis)
        torch.testing.assert_close(projector(memory.basis), projector(Q[:, : 1 + added]), rtol=0, atol=1e-9)


def test_basis_is_capped_at_the_dimension() -> None:
    dim = 4
    Q = orthonormal(dim, dim, seed=2)
    memory = Subspace(dim)
    memory.update(covariance(Q[:, :3], [3.0, 2.0, 1.0]), 1.5)  # threshold > 1: every column
    assert memory.rank == dim
    memory = Subspace(dim, basis=Q[:, :3])
    assert memory.update(covariance(Q, [1.0, 1.0, 1.0, 1.0]), 1.5) == 1  # not 4: only one dimension is left
    assert memory.rank == dim
    assert_orthonormal(memory.basis)
    assert memory.update(covariance(Q, [1.0, 2.0, 3.0, 4.0]), 1.5) == 0


def test_basis_stays_orthonormal_over_many_tasks() -> None:
    g = torch.Generator().manual_seed(3)
    memory = Subspace(DIM)
    spans = []
    for task in range(8):
        X = torch.randn(50, 2, generator=g, dtype=torch.float64) @ torch.randn(2, DIM, generator=g, dtype=torch.float64)
        X = X + 1e-3 * torch.randn(50, DIM, generator=g, dtype=torch.float64)  # a little full-rank noise
        spans.append(X)
        memory.update(X.T @ X / 50, threshold_at(0.97, task, 8))
        assert memory.rank <= DIM
        assert_orthonormal(memory.basis)
    assert memory.rank > 2  # it did grow past the first task


def test_residual_and_projection() -> None:
    Q = orthonormal(DIM, 3, seed=4)
    memory = Subspace(DIM, basis=Q[:, :2])
    cov = covariance(Q, [3.0, 2.0, 1.0])
    torch.testing.assert_close(memory.residual(cov), covariance(Q[:, 2:], [1.0]), rtol=0, atol=1e-12)
    top = memory.top_directions(cov, 1)[:, 0]
    assert abs(abs(float(top @ Q[:, 2])) - 1) < 1e-12
    delta = torch.randn(5, DIM, dtype=torch.float32)
    projected = memory.project_out_rows(delta)
    assert projected.dtype == torch.float32
    assert (projected.double() @ memory.basis).abs().max() < 1e-6  # no component left in the memory
    torch.testing.assert_close(memory.project_out_rows(projected), projected)
    torch.testing.assert_close(Subspace(DIM).project_out_rows(delta), delta)


def test_threshold_schedule() -> None:
    """eps_t = eps + (1 - eps) (t - 1) / T, t 1-based (``task_index`` = t - 1)."""
    assert threshold_at(0.995, 0, 5) == 0.995
    assert threshold_at(0.995, 4, 5) == pytest.approx(0.995 + 0.005 * 4 / 5, abs=1e-15)
    assert threshold_at(0.9, 2, 4) == pytest.approx(0.95, abs=1e-15)
    assert threshold_at(1.0, 3, 4) == 1.0


def test_covariance_accumulator_is_the_uncentred_second_moment() -> None:
    g = torch.Generator().manual_seed(5)
    X = torch.randn(37, 6, generator=g) + 3.0  # not centred: the mean must stay in
    acc = CovarianceAccumulator(6)
    for chunk in (X[:10], X[10:11], X[11:].view(2, 13, 6)):
        acc.update(chunk)
    assert acc.sum.dtype == torch.float64
    assert acc.count == 37
    torch.testing.assert_close(acc.covariance(), X.double().T @ X.double() / 37)
    with pytest.raises(RuntimeError, match="no features"):
        CovarianceAccumulator(3).covariance()
