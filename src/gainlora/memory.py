"""Gradient Projection Memory (GPM, Saha et al. 2021) as GainLoRA uses it (docs/method.md).

A memory is an orthonormal basis M (d x k) of the span of some layer's inputs over all old tasks.
It grows after each task by a thresholded SVD of that task's uncentred covariance, and is used to
project changes off the old inputs' span.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gainlora.dist import distributed


def threshold_at(eps: float, task_index: int, num_tasks: int) -> float:
    """eps_t = eps + (1 - eps) * (t - 1) / T for the 0-based ``task_index`` t - 1."""
    return eps + (1.0 - eps) * task_index / num_tasks


class CovarianceAccumulator:
    """Running uncentred covariance E[x x^T] of row vectors, accumulated in place in float64."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over the ranks of a process group (each rank collected its own share of the batches)."""
        if not distributed():
            return
        count = torch.tensor([self.count], dtype=torch.float64, device=self.sum.device)
        torch.distributed.all_reduce(self.sum)
        torch.distributed.all_reduce(count)
        self.count = int(count.item())

    def covariance(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("no features were collected")
        return self.sum / self.count


def _left_singular(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors (columns) and squared singular values of a square matrix, descending.

    Through eigh of the symmetric M M^T: about twice as fast as an SVD on CPU, and only U and S^2
    are ever used. Squaring costs relative precision only in directions whose share of the energy
    is below ~1e-16, far under any threshold in use (fp64).
    """
    evals, evecs = torch.linalg.eigh(matrix @ matrix.T)
    return evecs.flip(1), evals.flip(0).clamp_min(0)


class Subspace:
    """An orthonormal basis (d x k, float64) with the GPM update rule."""

    def __init__(self, dim: int, basis: Tensor | None = None) -> None:
        self.dim = dim
        self.basis = basis.to(torch.float64) if basis is not None else torch.zeros(dim, 0, dtype=torch.float64)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def residual(self, cov: Tensor) -> Tensor:
        """C - M M^T C: the part of the covariance outside the memory."""
        cov = cov.to(self.basis)
        if self.rank == 0:
            return cov
        return cov - self.basis @ (self.basis.T @ cov)

    def top_directions(self, cov: Tensor, k: int) -> Tensor:
        """Top-k left singular vectors (d x k) of the residual covariance."""
        if self.rank == 0:  # the covariance itself: symmetric PSD, so eigh gives its SVD directly
            return torch.linalg.eigh(cov.to(self.basis)).eigenvectors.flip(1)[:, :k]
        return _left_singular(self.residual(cov))[0][:, :k]

    def update(self, cov: Tensor, threshold: float) -> int:
        """Grow the basis with the new task's covariance; returns how many columns were added.

        Criterion as in the reference code: shares of squared singular values of the
        covariance itself. First task: keep the leading columns while the cumulative share stays
        below ``threshold`` (at least one). Later tasks: starting from the share the memory
        already captures, append residual directions while the captured share is below it.
        """
        cov = cov.to(self.basis.device, torch.float64)
        if self.rank == 0:
            # A covariance is symmetric PSD: eigh gives its SVD, faster and exactly symmetric.
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            energy = evals**2
            share = torch.cumsum(energy, 0) / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
            k = max(int((share < threshold).sum()), 1)
            self.basis = evecs[:, :k].contiguous()
            return k
        total = cov.square().sum()  # the sum of squared singular values is the squared Frobenius norm
        if total <= 0:
            return 0
        U, energy = _left_singular(self.residual(cov))
        captured = float((total - energy.sum()) / total)
        k = 0
        for e in (energy / total).tolist():
            if captured >= threshold:
                break
            captured += e
            k += 1
        k = min(k, self.dim - self.rank)
        if k == 0:
            return 0
        new = U[:, :k]
        # Re-orthogonalise against the old basis: guards against round-off drift over many tasks.
        new = new - self.basis @ (self.basis.T @ new)
        new, _ = torch.linalg.qr(new)
        self.basis = torch.cat([self.basis, new], 1)
        return k

    def project_out_rows(self, delta: Tensor) -> Tensor:
        """delta - delta M M^T: remove from each row its component in the memory's span."""
        if self.rank == 0:
            return delta
        M = self.basis.to(delta.device, torch.float64)
        d = delta.to(torch.float64)
        return (d - (d @ M) @ M.T).to(delta.dtype)
