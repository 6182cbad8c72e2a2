"""Reconstruction solvers under the discrepancy-principle constraint."""

import torch

from .cgls import cgls
from .datafit import (SolverResult, discrepancy_radius, discrepancy_ratio, relative_residual,
                      residual_norm, zero_fits, zero_fits_warning)
from .drip import Overflow
from .tv import constrained_tv, total_variation

# what a solve raises when a model's finite weights overflow the arithmetic: the eigensolver of
# the step bound's Lanczos matrix, the SVD of a projection's subspace problem (both PyTorch's,
# no NumPy linear algebra is left in a solve), the check of the CGLS start (drip reconstruct,
# evaluate, info and train turn it into one line naming the model)
LINALG_FAILURES = (torch.linalg.LinAlgError, Overflow)

__all__ = ["LINALG_FAILURES", "Overflow", "cgls", "constrained_tv", "total_variation", "SolverResult", "discrepancy_radius",
           "discrepancy_ratio", "relative_residual", "residual_norm", "zero_fits",
           "zero_fits_warning"]
