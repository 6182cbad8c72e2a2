"""The DRIP lower-level problem, per sample:

    minimize_z  R(z)   subject to   ||A E z - b|| <= radius         (u = E z)

solved by accelerated projected gradient: a gradient step on ``R``, then the Euclidean projection
onto the data-fit set (:mod:`.projection`, a Krylov method on ``A E``), so that the fixed points
are exactly the minimisers. The step is chosen per sample by backtracking: it starts from the
regularizer's curvature estimate on the infinite grid and is halved whenever the
sufficient-decrease condition fails, but never below ``1 / L`` for the guaranteed bound ``L`` on
the Lipschitz constant of ``grad R`` (4x the estimate, from the symmetric padding), where the
condition always holds. So however the parameters were trained, the solver never takes a step
longer than the local curvature allows. (For the non-convex leapfrog regularizer there is no such
bound: its floor is a safeguard, and the solver finds a stationary point, not necessarily the
global minimiser; the data fit is enforced all the same.) Nesterov momentum is restarted per
sample when the step turns against the momentum,
``<y - z_new, z_new - z> > 0`` (the gradient restart of O'Donoghue & Candes), which needs no
evaluation of ``R``.

A sample stops when its latent iterate changes by less than ``tolerance`` (relative) between two
iterations *and* its stationarity, ``||y - z_new|| / (t ||grad R(y)||)`` (the projected-gradient
step per unit step length, relative to the gradient: the share of ``grad R`` that the data-fit
constraint does not balance; 1 far from the solution, 0 at it), is at most
``stationarity_tolerance``; stopped samples leave the batch. The change alone is fooled by short
steps: with a sharp regularizer (``eps = 0.001``, so ``1 / L`` is small) on limited-angle
tomography, the first step moved the CGLS start by less than 1e-3, and every training solve
stopped after one iteration, at stationarity 0.9; the training gradient then pointed at cosine
0.2 to the true one and runs collapsed (validation 30.5 -> 28.1 dB in two epochs). On the blur
sample model the stationarity is 0.02-0.06 where the change reaches 1e-3 and below 2e-3 where
it reaches 1e-4, so ``stationarity_tolerance = 0.05`` costs a few iterations at most there. The
last operation on every sample is a CGLS run into the set (with a small margin, so the figure
survives rounding), so every returned ``z`` fits the data unless CGLS could not get there, which
is reported as ``converged = False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import batch_dot, per_sample
from ..operators import LinearOperator
from ..operators.composed import EmbeddedOperator
from .cgls import MARGIN, cgls
from .datafit import SolverResult
from .projection import project_onto_datafit


@dataclass
class DripSolution(SolverResult):
    latent: torch.Tensor | None = None     # (N, latent_channels, H, W); solution = E latent
    pixel_weights: torch.Tensor | None = None   # (N, 1, H, W) where R was weighted per pixel


def project(forward_op: EmbeddedOperator, b, radius, z, max_iterations: int):
    """Move ``z`` into ``{||A E z - b|| <= radius}`` by warm-started CGLS."""
    return cgls(forward_op, b, radius, u0=z, max_iterations=max_iterations)


@torch.no_grad()
def solve_drip(
    op: LinearOperator,
    embedding: torch.nn.Module,
    regularizer: torch.nn.Module,
    b: torch.Tensor,
    radius: torch.Tensor,
    z0: torch.Tensor | None = None,
    max_iterations: int = 300,
    tolerance: float = 1e-4,
    stationarity_tolerance: float = 0.05,
    projection_iterations: int = 50,
    final_projection_iterations: int = 1000,
    projection_tolerance: float = 1e-3,
    pixel_weights: torch.Tensor | None = None,
) -> DripSolution:
    """Solve the lower-level problem for a batch (see the module docstring).

    ``projection_iterations`` caps the Krylov steps of the projection inside each step, and
    ``projection_tolerance`` is its relative accuracy (:mod:`.projection`);
    ``final_projection_iterations`` caps the CGLS runs that start (from zero) and end the solve.
    ``pixel_weights`` (``(N, 1, H, W)``, positive; convex regularizers only) weighs ``R``'s
    terms per pixel (:mod:`drip_cli.regularizers.adaptive`); the steps and their bound scale
    with each sample's largest weight. The returned ``regularizer_value`` is the unweighted ``R``.
    """
    forward_op = EmbeddedOperator(op, embedding)
    radius = radius.to(device=b.device, dtype=b.dtype)
    n = b.shape[0]
    curvature, lipschitz = (t.to(b.dtype) for t in regularizer.curvature_and_lipschitz_bound())
    # a pixel weight m scales R's curvature by at most max(m)
    scale = (torch.ones(n, dtype=b.dtype, device=b.device) if pixel_weights is None
             else pixel_weights.to(b.dtype).flatten(1).amax(1))
    safe_step = 1.0 / (lipschitz * scale)                         # guaranteed: 1 / L
    step = 1.0 / (curvature * scale)                              # first guess, backtracked
    if z0 is None:  # the discrepancy-principle CGLS solution in latent space: feasible
        z0 = cgls(forward_op, b, radius, max_iterations=final_projection_iterations).solution
    solution = z0.clone()
    iterations = torch.full((n,), max_iterations, dtype=torch.int64, device=b.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=b.device)
    rows = torch.arange(n, device=b.device)

    z, z_prev = z0, z0
    # Iterate on the set CGLS will aim at, so the closing CGLS run finds every converged sample
    # already in place and leaves the minimiser where it is.
    b_work, radius_work, weights_work = b, (1 - MARGIN) * radius, pixel_weights
    momentum_t = torch.ones(n, dtype=b.dtype, device=b.device)
    for it in range(1, max_iterations + 1):
        t_next = (1 + torch.sqrt(1 + 4 * momentum_t**2)) / 2
        beta = (momentum_t - 1) / t_next
        y = z + per_sample(beta, z) * (z - z_prev)
        z_new, step, stationarity = _backtracking_step(
            forward_op, regularizer, b_work, radius_work, y, step, safe_step,
            projection_iterations, projection_tolerance, weights_work)
        against = ((y - z_new) * (z_new - z)).flatten(1).sum(1) > 0
        momentum_t = torch.where(against, torch.ones_like(t_next), t_next)
        change = (z_new - z).flatten(1).norm(dim=1) / z_new.flatten(1).norm(dim=1).clamp_min(1e-12)
        z_prev, z = torch.where(per_sample(against, z), z_new, z), z_new
        small = (change <= tolerance) & (stationarity <= stationarity_tolerance)
        done = small | (it == max_iterations)
        if bool(done.any()):  # retire finished samples; keep iterating on the rest only
            finished = rows[done]
            solution[finished], iterations[finished], stopped[finished] = z[done], it, small[done]
            keep = ~done
            rows = rows[keep]
            z, z_prev, momentum_t, step = z[keep], z_prev[keep], momentum_t[keep], step[keep]
            b_work, radius_work, safe_step = b_work[keep], radius_work[keep], safe_step[keep]
            if weights_work is not None:
                weights_work = weights_work[keep]
        if len(rows) == 0:
            break
    # Every iterate was projected, but a projection capped at projection_iterations may have
    # fallen short: the last word is a projection run to the tolerance.
    final = project(forward_op, b, radius, solution, final_projection_iterations)
    latent = final.solution
    return DripSolution(solution=embedding(latent), iterations=iterations + final.iterations,
                        converged=stopped & final.converged, latent=latent,
                        regularizer_value=regularizer.value(latent), pixel_weights=pixel_weights)


def _backtracking_step(forward_op, regularizer, b, radius, y, step, safe_step,
                       projection_iterations, projection_tolerance, pixel_weights=None):
    """``P(y - t grad R(y))`` with the per-sample step ``t`` halved (never below ``safe_step``)
    until the sufficient-decrease condition of Beck & Teboulle holds along ``d = z - y``:
    ``R(z) <= R(y) + <grad R(y), d> + ||d||^2 / (2 t)``, the local form of ``t <= 1 / L``.
    Returns ``z``, the steps and the stationarity ``||d|| / (t ||grad R(y)||)`` per sample."""
    def weighted(rows):   # R's keyword for the pixel weights of these rows, if any
        return {} if pixel_weights is None else {"pixel_weights": pixel_weights[rows]}

    value_y, gradient_y = regularizer.value_and_gradient(y, **weighted(slice(None)))
    step = torch.maximum(step, safe_step)

    def projected(rows, t):
        return project_onto_datafit(forward_op, b[rows], radius[rows],
                                    y[rows] - per_sample(t, y[rows]) * gradient_y[rows],
                                    projection_iterations, projection_tolerance)[0]

    z = projected(slice(None), step)
    pending = torch.arange(len(y), device=y.device)
    while True:
        d = z[pending] - y[pending]
        model = (value_y[pending] + batch_dot(gradient_y[pending], d)
                 + batch_dot(d, d) / (2 * step[pending]))
        slack = 1e-6 * value_y[pending].abs()   # rounding in R must not trigger a backtrack
        failed = ((regularizer.value(z[pending], **weighted(pending)) > model + slack)
                  & (step[pending] > safe_step[pending]))
        if not bool(failed.any()):
            stationarity = ((z - y).flatten(1).norm(dim=1)
                            / (step * gradient_y.flatten(1).norm(dim=1)).clamp_min(1e-30))
            return z, step, stationarity
        pending = pending[failed]
        step[pending] = torch.maximum(step[pending] / 2, safe_step[pending])
        z[pending] = projected(pending, step[pending])
