"""Constrained total variation: ``min_u TV(u)  s.t.  ||A u - b|| <= radius``, per sample.

``TV(u) = sum_{c,i,j} ||(grad u_c)_{ij}||_2`` (isotropic, per channel). Solved with the
primal-dual hybrid gradient method (Chambolle & Pock) on ``min_u F(K u)`` with
``K = [grad; w A / ||A||]`` and
``F(p, q) = ||p||_{2,1} + indicator(||q - w b / ||A|| || <= w radius / ||A||)``:

    u+  = u - tau K^T y
    y+  = prox_{sigma F*}(y + sigma K (2 u+ - u))

with ``tau * sigma * ||K||^2 <= 1``, ``||K||^2 <= 8 + w^2``, for which ``||A||`` must not be
under-estimated: it is bounded from above by Lanczos (:func:`~drip_cli.operators.norm_bound`),
not estimated by power iteration, whose figure is a lower bound. (With ``||A||`` taken 30% low,
PDHG diverged to NaN on the sample files' blur and tomography; 10% low, it still converged.)
The data block weight ``w`` (``DATA_WEIGHT``) balances the two dual variables; the steps are
adapted per sample to balance the primal and dual residuals (Goldstein, Li & Yuan, 2015),
keeping ``tau * sigma`` fixed.
A sample stops when both residuals are below ``tolerance`` relative to the terms they compare and
it fits the data to within ``feasibility_slack``; stopped samples leave the batch. PDHG is only
feasible in the limit, so a last CGLS pass started at the PDHG point enforces the constraint
exactly (``converged`` is False for a sample that reached ``max_iterations``). A sample where a
constant image fits the data needs no iteration: TV is zero there, its least value
(:func:`~drip_cli.solvers.datafit.best_constant`).
"""

from __future__ import annotations

import torch

from ..batching import per_sample
from ..operators import LinearOperator, norm_bound
from ..operators.finite_differences import GRADIENT_NORM_SQUARED_BOUND, gradient, gradient_adjoint
from .cgls import MARGIN, cgls
from .datafit import SolverResult, best_constant, checked_problem


def total_variation(u: torch.Tensor) -> torch.Tensor:
    """Isotropic TV per sample, ``(N,)``."""
    return gradient(u).pow(2).sum(1).sqrt().flatten(1).sum(1)


def _project_ball(w: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    offset = w - centre
    norm = offset.flatten(1).norm(dim=1)
    scale = torch.where(norm > radius, radius / norm.clamp_min(torch.finfo(w.dtype).tiny),
                        torch.ones_like(norm))
    return centre + per_sample(scale, offset) * offset


# Weight of the data block in K. ||grad||^2 = 8 dwarfs ||A / ||A|| ||^2 = 1; weighting the data
# block up balances the two dual variables (measured: with weight 10, about 1000 iterations reach
# within 2% of the TV value that 16000 iterations give on 64x64 blur; with weight 1, 8000 do not).
DATA_WEIGHT = 10.0


def _norms(*blocks: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-norm of several blocks taken together."""
    return sum(t.flatten(1).pow(2).sum(1) for t in blocks).sqrt()


@torch.no_grad()
def constrained_tv(
    op: LinearOperator,
    b: torch.Tensor,
    radius: torch.Tensor,
    op_norm: float | None = None,
    primal_step: float = 1e-2,
    max_iterations: int = 5000,
    tolerance: float = 1e-3,
    feasibility_slack: float = 0.01,
    u0: torch.Tensor | None = None,
    progress=None,
    progress_every: int = 50,
) -> SolverResult:
    """Solve constrained TV for a batch; see the module docstring.

    ``progress``, if given, is called as ``progress(iteration, n_active)`` now and then.
    """
    radius = checked_problem(op, b, radius).to(dtype=b.dtype)
    if op_norm is None:
        op_norm = norm_bound(op, device=b.device)
    scale = DATA_WEIGHT / op_norm
    n = b.shape[0]

    def apply_k(u):
        return gradient(u), scale * op(u)

    def apply_kt(p, q):
        return gradient_adjoint(p), scale * op.adjoint(q)

    iterations = torch.full((n,), max_iterations, dtype=torch.int64, device=b.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=b.device)
    # where a constant per channel fits, it is a minimiser (TV = 0): no iteration
    flat, solution = best_constant(op, b, (1 - MARGIN) * radius)
    iterations[flat], stopped[flat] = 0, True
    rows = torch.arange(n, device=b.device)[~flat]  # which samples the working tensors hold
    if progress is not None and len(rows) < n:
        progress(0, len(rows))
    b_scaled, radius_scaled = b[rows] * scale, radius[rows] * scale
    step_product = 1.0 / (GRADIENT_NORM_SQUARED_BOUND + DATA_WEIGHT**2)  # tau * sigma * ||K||^2 <= 1
    tau = torch.full((len(rows),), primal_step, dtype=b.dtype, device=b.device)
    sigma = step_product / tau
    adapt = torch.full_like(tau, 0.5)
    if u0 is not None:
        u = u0[rows]
    elif len(rows):  # the discrepancy-principle CGLS solution: feasible and close to the answer
        u = cgls(op, b[rows], radius[rows]).solution
    else:
        u = solution[rows]
    ku_p, ku_q = apply_k(u)
    p, q = torch.zeros_like(ku_p), torch.zeros_like(ku_q)
    kty = torch.zeros_like(u)
    for it in range(1, max_iterations + 1):
        if len(rows) == 0:
            break
        u_new = u - per_sample(tau, u) * kty
        kun_p, kun_q = apply_k(u_new)
        sig_p, sig_q = per_sample(sigma, p), per_sample(sigma, q)
        # dual step at the extrapolated point K(2 u_new - u), by linearity
        p_new = p + sig_p * (2 * kun_p - ku_p)
        p_new = p_new / p_new.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1.0)
        v = q + sig_q * (2 * kun_q - ku_q)
        q_new = v - sig_q * _project_ball(v / sig_q, b_scaled, radius_scaled)
        kty_p, kty_q = apply_kt(p_new, q_new)
        kty_new = kty_p + kty_q
        # residuals of the optimality conditions (Goldstein, Li & Yuan, 2015); at the solution
        # K^T y = 0, i.e. the TV and data terms of K^T y cancel
        primal_res = _norms((u - u_new) / per_sample(tau, u) - (kty - kty_new))
        dual_res = _norms((p - p_new) / sig_p - (ku_p - kun_p), (q - q_new) / sig_q - (ku_q - kun_q))
        # balance the two residuals with per-sample steps (tau * sigma stays fixed)
        grow, shrink = primal_res > 1.5 * dual_res, dual_res > 1.5 * primal_res
        factor = torch.where(grow, 1 / (1 - adapt), torch.where(shrink, 1 - adapt, torch.ones_like(adapt)))
        tau, sigma = tau * factor, sigma / factor
        adapt = torch.where(grow | shrink, adapt * 0.95, adapt)
        u, ku_p, ku_q, p, q, kty = u_new, kun_p, kun_q, p_new, q_new, kty_new

        small = (primal_res <= tolerance * torch.maximum(_norms(kty_p), _norms(kty_q))) & \
                (dual_res <= tolerance * _norms(kun_p, kun_q))
        fits = (ku_q - b_scaled).flatten(1).norm(dim=1) <= (1 + feasibility_slack) * radius_scaled
        done = small & fits
        if bool(done.any()):  # retire finished samples; keep iterating on the rest only
            finished = rows[done]
            solution[finished], iterations[finished], stopped[finished] = u[done], it, True
            keep = ~done
            rows = rows[keep]
            u, ku_p, ku_q, p, q, kty = u[keep], ku_p[keep], ku_q[keep], p[keep], q[keep], kty[keep]
            tau, sigma, adapt = tau[keep], sigma[keep], adapt[keep]
            b_scaled, radius_scaled = b_scaled[keep], radius_scaled[keep]
        if progress is not None and (it % progress_every == 0 or len(rows) == 0):
            progress(it, len(rows))
    solution[rows] = u  # samples that reached max_iterations
    final = cgls(op, b, radius, u0=solution)
    return SolverResult(solution=final.solution, iterations=iterations + final.iterations,
                        converged=stopped & final.converged)
