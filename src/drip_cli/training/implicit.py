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
``H = hess R(z) + mu B^T B``. It is solved per sample by projected preconditioned conjugate
gradients on the tangent space ``{g^T lam = 0}`` (Gould, Hribar & Nocedal 2001: the
preconditioned residual is projected in the preconditioner's metric), then
``lam_mu = g^T (v - H lam) / ||g||^2``.
``z``, ``mu`` and ``lam`` are constants for autograd; differentiating ``Phi`` reaches every
parameter of ``R`` and ``E``.

How accurately ``lam`` is solved sets how accurate the training gradient is. ``H`` is badly
conditioned once ``R`` is trained: ``hess R`` is large on flat regions and nearly zero across
edges, the directions the solution is most sensitive to. At the sample model (blur, 16 crops), 20
CG iterations, plain or preconditioned, gave a parameter gradient at cosine 0.36-0.41 to the exact
one (and up to twice as long); 100 preconditioned ones 0.93, 200 0.98. Two things make more
iterations affordable: the convex regularizer's Hessian product in closed form (two convolutions
instead of autograd's second-order pass: 20 iterations for 8 crops in 0.16 instead of 0.42 s) and
a diagonal (Jacobi) preconditioner from its diagonal plus ``mu`` times the mean diagonal of
``B^T B`` (estimated with Rademacher probes). The more accurate gradient did not, however, lift where
training levels off: 10-minute runs with 100 iterations reached the same validation PSNR as with
20 (blur 31.555 vs 31.562 dB; tomography 30.59 vs 30.52), so the stall after about one epoch is
the model family's, not the gradient's.
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


def hessian_at(regularizer, z: torch.Tensor, pixel_weights: torch.Tensor | None = None):
    """``(h -> hess R(z) h, diagonal or None)``: the regularizer's own closed form where it has
    one, automatic differentiation (and no diagonal) otherwise. ``pixel_weights``: of a
    reweighted solve (convex regularizers only)."""
    if hasattr(regularizer, "hessian_at"):
        return regularizer.hessian_at(z, pixel_weights)
    if pixel_weights is not None:
        raise ValueError("pixel weights need a regularizer with a closed-form Hessian")
    return (lambda h: hessian_vector(regularizer, z, h)), None


def mean_gram_diagonal(forward_op, like: torch.Tensor, probes: int = 4) -> torch.Tensor:
    """``trace(B^T B) / n`` estimated from ``probes`` fixed Rademacher vectors
    (``E ||B v||^2 = trace(B^T B)``): the data term's share of the preconditioner."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2, (probes, *like.shape[1:]), generator=gen).to(like) * 2 - 1
    return forward_op(v).flatten(1).pow(2).sum(1).mean() / like[0].numel()


def _ratio_where(active: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor):
    """``numerator / denominator`` for active samples, 0 for the others (never divides there)."""
    return torch.where(active, numerator / torch.where(active, denominator, 1.0), 0.0)


def implicit_surrogate(op, embedding, regularizer, b: torch.Tensor, z: torch.Tensor,
                       v: torch.Tensor, cg_iterations: int = 50, damping: float = 1e-6,
                       cg_tolerance: float = 1e-4,
                       pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """A scalar whose gradient in the parameters is ``dL/dtheta`` through the solution ``z``
    (see the module docstring); add it to the loss's direct part and call ``backward``.
    ``pixel_weights``: those of the solve that gave ``z`` (a reweighting pass); where they carry
    a graph (computed from an earlier pass's solution), the scalar's gradient reaches through
    them too (``dL/dm``, as for any other input of ``grad R``)."""
    z, v = z.detach(), v.detach()
    # held constant in the KKT solve; in Phi as given, so that a graph behind them is followed
    weighted = {} if pixel_weights is None else {"pixel_weights": pixel_weights.detach()}
    live = {} if pixel_weights is None else {"pixel_weights": pixel_weights}
    with torch.no_grad():
        forward_op = EmbeddedOperator(op, embedding)
        g = forward_op.adjoint(forward_op(z) - b)
        gg = batch_dot(g, g).clamp_min(torch.finfo(z.dtype).tiny)
        mu = (-batch_dot(regularizer.gradient(z, **weighted), g) / gg).clamp_min(0)
        hessian_r, diagonal = hessian_at(regularizer, z, **weighted)

        def hessian(t):
            return hessian_r(t) + per_sample(mu, t) * forward_op.adjoint(forward_op(t)) + damping * t

        if diagonal is None:
            inverse = torch.ones_like(z)
        else:
            data_diagonal = mu * mean_gram_diagonal(forward_op, z)
            inverse = 1 / (diagonal + per_sample(data_diagonal, z) + damping)
        g_inverse_g = batch_dot(g, inverse * g).clamp_min(torch.finfo(z.dtype).tiny)

        def precondition(r):   # M^-1 r, projected onto {g^T lam = 0} in M's metric
            return inverse * (r - per_sample(batch_dot(g, inverse * r) / g_inverse_g, r) * g)

        lam = torch.zeros_like(v)
        residual = -v                       # H lam - v
        preconditioned = precondition(residual)
        direction = -preconditioned
        rz = batch_dot(residual, preconditioned)
        # per sample, CG stops at a relative (preconditioned) residual of ``cg_tolerance`` or
        # where the curvature along the direction is not positive (rounding, once converged):
        # carrying on there divided by ~0 and turned a float32 training run into NaN after 7 steps
        stop = rz * cg_tolerance**2
        active = rz > stop
        for _ in range(cg_iterations):
            if not bool(active.any()):
                break
            h_dir = hessian(direction)
            curvature = batch_dot(direction, h_dir)
            active = active & (curvature > 0)
            alpha = _ratio_where(active, rz, curvature)
            lam = lam + per_sample(alpha, lam) * direction
            residual = residual + per_sample(alpha, residual) * h_dir
            preconditioned = precondition(residual)
            rz_new = batch_dot(residual, preconditioned)
            active = active & (rz_new > stop)
            beta = _ratio_where(active, rz_new, rz)
            direction = -preconditioned + per_sample(beta, direction) * direction
            rz = rz_new
        lam_mu = batch_dot(g, v - hessian(lam)) / gg
    forward_op = EmbeddedOperator(op, embedding)
    data_residual = forward_op(z) - b
    stationarity = (regularizer.gradient(z, **live)
                    + per_sample(mu, z) * forward_op.adjoint(data_residual))
    phi = batch_dot(lam, stationarity) + lam_mu * 0.5 * batch_dot(data_residual, data_residual)
    return -phi.sum()


def surrogate_through_passes(op, embedding, regularizer, b: torch.Tensor, latents, v: torch.Tensor,
                             reweigh, cg_iterations: int = 50) -> torch.Tensor:
    """:func:`implicit_surrogate` for reweighted solves, through every pass: ``latents`` are the
    passes' solutions, first to last, ``v = dL/dz`` at the last, and pass ``i > 0`` was weighted
    by ``reweigh(E z_{i-1})``. Each pass's surrogate also differentiates through its weights;
    its gradient in the previous solution, ``dL/dz_{i-1}``, is that pass's ``v``."""
    latents = [z.detach().requires_grad_(True) for z in latents]
    total = 0.0
    for i in range(len(latents) - 1, -1, -1):
        weights = reweigh(embedding(latents[i - 1])) if i else None
        part = implicit_surrogate(op, embedding, regularizer, b, latents[i], v, cg_iterations,
                                  pixel_weights=weights)
        total = total + part
        if i:
            (v,) = torch.autograd.grad(part, latents[i - 1], retain_graph=True)
    return total
