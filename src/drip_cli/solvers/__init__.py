"""Reconstruction solvers under the discrepancy-principle constraint."""

from .cgls import cgls
from .datafit import (SolverResult, discrepancy_radius, discrepancy_ratio, relative_residual,
                      residual_norm)
from .tv import constrained_tv, total_variation

__all__ = ["cgls", "constrained_tv", "total_variation", "SolverResult", "discrepancy_radius",
           "discrepancy_ratio", "relative_residual", "residual_norm"]
