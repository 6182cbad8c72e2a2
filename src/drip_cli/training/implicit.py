"""Gradients of the upper-level loss through the *exact* lower-level solution (implicit
differentiation of the KKT conditions), so training optimises the solutions the solver converges to.

At a solution ``z`` of ``min R(z) s.t. 1/2 ||B z - b||^2 <= 1/2 r^2`` (``B = A E``) with the
constraint active,

    grad R(z) + mu B^T (B z - b) = 0,      1/2 ||B z - b||^2 - 1/2 r^2 = 0,

with multiplier ``mu >= 0`` (here the least-squares estimate ``-<grad R, g> / ||g||^2``,
``g = B^T (B z - b)``). For a loss ``L(z)`` with ``v = dL/dz``, the implicit function theorem
gives ``dL/dtheta = -dPhi/dtheta`` with

    Phi(theta) = <lam, grad R_theta(z) + mu B_theta^T (B_theta z - b)> + lam_mu 1/2 ||B_theta z - b||^2

where ``[lam; lam_mu]`` solves the symmetric KKT system ``[[H, g], [g^T, 0]] [lam; lam_mu] = [v; 0]``,
``H = hess R(z) + mu B^T B``. It is solved per sample by conjugate gradients on the tangent space
``{g^T lam = 0}`` (``P H P lam = P v``, ``P`` the projector), then ``lam_mu = g^T (v - H lam) / ||g||^2``.
``z``, ``mu`` and ``lam`` are constants for autograd; differentiating ``Phi`` reaches every
parameter of ``R`` and ``E``.
"""

from __future__ import annotations

import torch

from ..batching import batch_dot, per_sample
from ..operators.composed import EmbeddedOperator


def hessian_vector(regularizer, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``hess R(z) h`` by differentiating the closed-form gradient (no graph kept)."""
    with torch.enable_grad():
        point = z.detach().requires_grad_(True)
        (product,) = torch.autograd.grad(regularizer.gradient(point), point, grad_outputs=h)
    return product


def _ratio_where(active: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor):
    """``numerator / denominator`` for active samples, 0 for the others (never divides there)."""
    return torch.where(active, numerator / torch.where(active, denominator, 1.0), 0.0)


def implicit_surrogate(op, embedding, regularizer, b: torch.Tensor, z: torch.Tensor,
                       v: torch.Tensor, cg_iterations: int = 50, damping: float = 1e-6,
                       cg_tolerance: float = 1e-4) -> torch.Tensor:
    """A scalar whose gradient in the parameters is ``dL/dtheta`` through the solution ``z``
    (see the module docstring); add it to the loss's direct part and call ``backward``."""
    z, v = z.detach(), v.detach()
    with torch.no_grad():
        forward_op = EmbeddedOperator(op, embedding)
        g = forward_op.adjoint(forward_op(z) - b)
        gg = batch_dot(g, g).clamp_min(torch.finfo(z.dtype).tiny)
        mu = (-batch_dot(regularizer.gradient(z), g) / gg).clamp_min(0)

        def project(t):
            return t - per_sample(batch_dot(g, t) / gg, t) * g

        def hessian(t):
            return (hessian_vector(regularizer, z, t)
                    + per_sample(mu, t) * forward_op.adjoint(forward_op(t)) + damping * t)

        lam = torch.zeros_like(v)
        residual = project(v)
        direction = residual
        rr = batch_dot(residual, residual)
        # per sample, CG stops at a relative residual of ``cg_tolerance`` or where the curvature
        # along the direction is not positive (rounding, once converged): carrying on there
        # divided by ~0 and turned a float32 training run into NaN after 7 steps
        stop = rr * cg_tolerance**2
        active = rr > stop
        for _ in range(cg_iterations):
            if not bool(active.any()):
                break
            h_dir = project(hessian(direction))
            curvature = batch_dot(direction, h_dir)
            active = active & (curvature > 0)
            alpha = _ratio_where(active, rr, curvature)
            lam = lam + per_sample(alpha, lam) * direction
            residual = residual - per_sample(alpha, residual) * h_dir
            rr_new = batch_dot(residual, residual)
            active = active & (rr_new > stop)
            beta = _ratio_where(active, rr_new, rr)
            direction = residual + per_sample(beta, direction) * direction
            rr = rr_new
        lam_mu = batch_dot(g, v - hessian(lam)) / gg
    forward_op = EmbeddedOperator(op, embedding)
    data_residual = forward_op(z) - b
    stationarity = regularizer.gradient(z) + per_sample(mu, z) * forward_op.adjoint(data_residual)
    phi = batch_dot(lam, stationarity) + lam_mu * 0.5 * batch_dot(data_residual, data_residual)
    return -phi.sum()
