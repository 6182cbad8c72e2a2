"""Reconstruction methods behind ``drip reconstruct --method``.

A method turns a batch of measurements into images that satisfy the data-fit constraint
``||A u - b|| <= radius`` and reports a regularizer value per sample (NaN when it has none).
"""

from __future__ import annotations

import math

import torch

from .operators import LinearOperator, estimate_norm
from .solvers import SolverResult, cgls, constrained_tv, total_variation


class ReconstructionMethod:
    name: str = ""
    needs_model: bool = False

    def solve(self, op: LinearOperator, b: torch.Tensor, radius: torch.Tensor) -> SolverResult:
        raise NotImplementedError

    def regularizer_value(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full((u.shape[0],), math.nan, dtype=torch.float64)


class CGLSMethod(ReconstructionMethod):
    """CGLS from zero, stopped per sample by the discrepancy principle (no regularizer)."""

    name = "cgls"

    def __init__(self, max_iterations: int = 1000):
        self.max_iterations = max_iterations

    def solve(self, op, b, radius):
        return cgls(op, b, radius, max_iterations=self.max_iterations)


class TVMethod(ReconstructionMethod):
    """Constrained isotropic total variation (regularizer value: ``TV(u)``)."""

    name = "tv"

    def __init__(self, max_iterations: int = 5000, tolerance: float = 1e-3):
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self._norms: dict[int, float] = {}

    def solve(self, op, b, radius):
        key = id(op)
        if key not in self._norms:  # one power iteration per operator, not per batch
            self._norms[key] = estimate_norm(op, device=b.device)
        return constrained_tv(op, b, radius, op_norm=self._norms[key],
                              max_iterations=self.max_iterations, tolerance=self.tolerance)

    def regularizer_value(self, u):
        return total_variation(u.double())


CLASSICAL_METHODS = {"cgls": CGLSMethod, "tv": TVMethod}
