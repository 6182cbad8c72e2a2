"""The data-fit constraint of the discrepancy principle, per sample.

For sample ``i`` with noise level ``sigma_i`` and ``M`` measured entries, a reconstruction ``u``
fits the data when ``||A u - b||_2 <= tau * sigma_i * sqrt(M)``; its *discrepancy ratio* is
``||A u - b||_2 / (sigma_i * sqrt(M))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..operators import LinearOperator


def residual_norm(op: LinearOperator, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||A u - b||_2`` per sample, shape ``(N,)``."""
    return (op(u) - b).flatten(1).norm(dim=1)


def discrepancy_radius(op: LinearOperator, noise_std: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * sigma * sqrt(M)`` per sample."""
    return tau * noise_std * math.sqrt(op.measured_count)


def discrepancy_ratio(op: LinearOperator, u: torch.Tensor, b: torch.Tensor,
                      noise_std: torch.Tensor) -> torch.Tensor:
    """``||A u - b|| / (sigma sqrt(M))`` per sample, computed in float64."""
    u, b = u.double(), b.double()
    return residual_norm(op, u, b) / discrepancy_radius(op, noise_std.double().to(u.device), 1.0)


@dataclass
class SolverResult:
    """What every reconstruction solver returns, per sample."""

    solution: torch.Tensor          # (N, C, H, W)
    iterations: torch.Tensor        # (N,) int64: iterations this sample used
    converged: torch.Tensor         # (N,) bool: the solver's own stopping rule was met
    regularizer_value: torch.Tensor | None = None  # (N,): the regularizer at the solution, if any
