"""Forward differences with Neumann boundary, the discrete gradient behind total variation.

``gradient(u)[:, 0]`` is the vertical difference ``u[i+1, j] - u[i, j]`` (0 on the last row),
``gradient(u)[:, 1]`` the horizontal one; ``gradient_adjoint`` is its exact adjoint (minus the
divergence). ``||gradient||^2 <= 8``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRADIENT_NORM_SQUARED_BOUND = 8.0


def gradient(u: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, 2, C, H, W)``."""
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1, 0, 0))
    return torch.stack((dy, dx), dim=1)


def gradient_adjoint(p: torch.Tensor) -> torch.Tensor:
    """``(N, 2, C, H, W) -> (N, C, H, W)``, the adjoint of :func:`gradient`."""
    py, px = p[:, 0], p[:, 1]
    py, px = py[..., :-1, :], px[..., :, :-1]  # the last row / column of p never meets u
    adjoint_y = F.pad(py, (0, 0, 1, 0)) - F.pad(py, (0, 0, 0, 1))
    adjoint_x = F.pad(px, (1, 0, 0, 0)) - F.pad(px, (0, 1, 0, 0))
    return adjoint_y + adjoint_x
