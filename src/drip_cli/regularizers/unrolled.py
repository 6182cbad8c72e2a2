"""The paper's unrolled baseline: a learned proximal-gradient network (no data-fit guarantee).

    x_0     = s A^T b                      (one steepest-descent step from 0, exact line search)
    y_k     = x_{k-1} + CNN_k(x_{k-1})     (a learned residual "proximal" step)
    x_k     = y_k - a_k A^T (A y_k - b),   a_k = ||g||^2 / ||A g||^2,  g = A^T (A y_k - b)

for ``k = 1..K`` (``layers``), each ``CNN_k`` with its own weights (conv - ReLU - conv - ReLU -
conv, ``width`` channels, zero padding). The step sizes ``a_k`` are the exact line search on
``||A x - b||^2`` per sample, so the data steps have no parameters and never diverge. The last
convolution of every CNN starts at zero: an untrained network is ``K + 1`` steepest-descent
steps, a sensible (under-resolved) start.

This is what DRIP is compared against: it learns update directions, not a regularizer with a
value, and its output fits the data only as far as ``K`` data steps happen to take it. It is
trained by ordinary backpropagation through the ``K`` steps (:mod:`drip_cli.training`), and
``drip reconstruct`` and ``drip evaluate`` report its discrepancy ratios as they are.
"""

from __future__ import annotations

import torch

from ..batching import batch_dot, per_sample
from ..solvers.datafit import SolverResult, checked_problem, residual_norm


def steepest_descent_step(op, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x - a A^T (A x - b)`` with the exact line search ``a = ||g||^2 / ||A g||^2`` per sample."""
    g = op.adjoint(op(x) - b)
    ag = op(g)
    a = batch_dot(g, g) / batch_dot(ag, ag).clamp_min(torch.finfo(g.dtype).tiny)
    return x - per_sample(a, g) * g


class ResidualBlock(torch.nn.Module):
    """``CNN_k``: three 3x3 convolutions with ReLUs in between; the last starts at zero."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, channels, 3, padding=1))
        torch.nn.init.zeros_(self.layers[-1].weight)
        torch.nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.layers[0].weight.dtype
        return self.layers(x.to(dtype)).to(x.dtype)


class UnrolledNetwork(torch.nn.Module):
    """``K`` rounds of a residual CNN step and an exact-line-search data step (see the module)."""

    def __init__(self, image_channels: int = 1, layers: int = 6, width: int = 32):
        super().__init__()
        if layers < 1:
            raise ValueError("an unrolled network needs at least one layer")
        self.blocks = torch.nn.ModuleList(ResidualBlock(image_channels, width) for _ in range(layers))

    @property
    def reach(self) -> int:
        return 1  # zero-padded convolutions: any image size works

    def forward(self, op, b: torch.Tensor) -> torch.Tensor:
        """The reconstruction, differentiable in the parameters (for training)."""
        x = steepest_descent_step(op, torch.zeros((b.shape[0], *op.image_shape), dtype=b.dtype,
                                                  device=b.device), b)
        for block in self.blocks:
            x = steepest_descent_step(op, x + block(x), b)
        return x

    def solve(self, op, b: torch.Tensor, radius: torch.Tensor | None = None,
              progress=None) -> SolverResult:
        """Reconstruct a batch. ``radius`` is ignored: the network has no data-fit constraint
        (``converged`` says whether it happened to fit, when ``radius`` is given). Its fixed
        number of steps takes milliseconds: ``progress`` is accepted, as by every solve, and
        never called."""
        if radius is not None:
            radius = checked_problem(op, b, radius)
        with torch.no_grad():
            x = self.forward(op, b)
        n = b.shape[0]
        iterations = torch.full((n,), len(self.blocks), dtype=torch.int64, device=b.device)
        fits = (torch.ones(n, dtype=torch.bool, device=b.device) if radius is None else
                residual_norm(op, x, b) <= radius.to(b.device))
        return SolverResult(solution=x, iterations=iterations, converged=fits)
