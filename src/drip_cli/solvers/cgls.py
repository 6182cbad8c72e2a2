"""CGLS with per-sample stopping by the discrepancy principle.

CGLS minimises ``||A u - b||`` by conjugate gradients on the normal equations, started at ``u0``.
Each sample stops where its residual first reaches ``radius`` (times ``1 - margin``, so the figure
survives float32 rounding when recomputed): the last step is shortened to land on that level
rather than jump past it; a stopped sample is frozen while the others go
on. Started at zero, this is the classical discrepancy-principle regularisation by early stopping;
warm-started at a point, it moves that point into the data-fit set along Krylov directions (the
projection step of DRIP and the final feasibility step of TV).

All updates are out of place, so the solver is differentiable end to end.
"""

from __future__ import annotations

import torch

from ..batching import batch_dot, per_sample
from ..operators import LinearOperator
from .datafit import SolverResult, checked_problem

MARGIN = 1e-3  # relative safety margin below the radius, so fits survive float32 rounding


def cgls(
    op: LinearOperator,
    b: torch.Tensor,
    radius: torch.Tensor,
    u0: torch.Tensor | None = None,
    max_iterations: int = 500,
    margin: float = MARGIN,
) -> SolverResult:
    """Run CGLS on each sample until ``||A u - b|| <= (1 - margin) * radius``.

    Args:
        op: the forward operator.
        b: measurements ``(N, C, *S)``.
        radius: per-sample target residual norm ``(N,)`` (``tau * sigma * sqrt(M)``).
        u0: starting images (default zero).
        max_iterations: cap per sample; a sample that does not reach its radius by then (or whose
            search direction vanishes first) is reported with ``converged = False``.
        margin: relative safety margin below ``radius``.
    """
    radius = checked_problem(op, b, radius)
    # Work on the data scaled per sample by the power of two that brings max |b| into [0.5, 1):
    # exact, so the iterates are bit for bit the unscaled ones times that power wherever nothing
    # over- or underflows, and the data's own scale no longer can (the landing quadratic's
    # coefficients scale as its fourth power: tomography data of 1e10 overflowed them in float32
    # and jumped past the target, to a discrepancy ratio of 0.84; data of 1e13 overflowed
    # ||A p||^2 and returned zero; 1e-15 underflowed them). The largest entry, not the norm:
    # squares of entries of 1e-20 flush to zero on the CPU, and so did ||b||.
    unit = torch.ldexp(torch.ones_like(radius, dtype=b.dtype, device=b.device),
                       -torch.frexp(b.detach().flatten(1).abs().amax(dim=1)).exponent)
    b = per_sample(unit, b) * b
    target = (1.0 - margin) * radius.to(device=b.device, dtype=b.dtype) * unit
    u = (torch.zeros((b.shape[0], *op.image_shape), dtype=b.dtype, device=b.device)
         if u0 is None else per_sample(unit, u0) * u0)
    r = b - op(u)
    s = op.adjoint(r)
    p = s
    gamma = batch_dot(s, s)
    # A step aimed exactly at the target lands within rounding of it: accept that as arrived.
    stop_level = target * (1 + 1e-6)
    residual = r.flatten(1).norm(dim=1)
    active = residual > stop_level
    iterations = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    tiny = torch.finfo(b.dtype).tiny
    for _ in range(max_iterations):
        if not bool(active.any()):
            break
        q = op(p)
        qq = batch_dot(q, q)
        # A vanishing search direction means the residual cannot shrink further.
        active = active & (qq > tiny) & (gamma > tiny)
        alpha = gamma / qq.clamp_min(tiny)
        # Stop exactly where the residual crosses the target instead of overshooting past it:
        # ||r - a q||^2 = target^2 at the smaller root a of a quadratic.
        rq = (r * q).flatten(1).sum(1)
        rr = residual.pow(2)
        disc = rq.pow(2) - qq * (rr - target.pow(2))
        alpha_hit = (rq - disc.clamp_min(0).sqrt()) / qq.clamp_min(tiny)
        alpha = torch.where((disc >= 0) & (alpha_hit < alpha), alpha_hit, alpha)
        alpha = torch.where(active, alpha, torch.zeros_like(alpha))
        u = u + per_sample(alpha, u) * p
        r = r - per_sample(alpha, r) * q
        s = op.adjoint(r)
        gamma_new = batch_dot(s, s)
        beta = torch.where(active, gamma_new / gamma.clamp_min(tiny), torch.zeros_like(gamma))
        p = torch.where(per_sample(active, p), s + per_sample(beta, p) * p, p)
        gamma = torch.where(active, gamma_new, gamma)
        iterations = iterations + active.long()
        residual = r.flatten(1).norm(dim=1)
        active = active & (residual > stop_level)
    converged = residual <= stop_level
    return SolverResult(solution=u / per_sample(unit, u), iterations=iterations,
                        converged=converged)
