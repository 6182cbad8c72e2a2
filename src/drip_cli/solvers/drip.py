"""The DRIP lower-level problem, per sample:

    minimize_z  R(z)   subject to   ||A E z - b|| <= radius         (u = E z)

solved by accelerated projected gradient: a gradient step on ``R`` of length ``step_scale / L``
(``L`` an upper bound on the Lipschitz constant of ``grad R``, so the step can never exceed
``1/L`` however the parameters were trained), then a projection onto the data-fit set computed by
CGLS on ``A E``, warm-started at that point and stopped as soon as the sample fits. Nesterov
momentum is restarted per sample when the step turns against the momentum,
``<y - z_new, z_new - z> > 0`` (the gradient restart of O'Donoghue & Candes), which needs no
evaluation of ``R``.

A sample stops when its latent iterate changes by less than ``tolerance`` (relative) between two
iterations; stopped samples leave the batch. The
last operation on every sample is a projection, so every returned ``z`` fits the data unless
CGLS could not get there, which is reported as ``converged = False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import per_sample
from ..operators import LinearOperator
from ..operators.composed import EmbeddedOperator
from .cgls import cgls
from .datafit import SolverResult


@dataclass
class DripSolution(SolverResult):
    latent: torch.Tensor | None = None     # (N, latent_channels, H, W); solution = E latent


def project(forward_op: EmbeddedOperator, b, radius, z, max_iterations: int):
    """Move ``z`` into ``{||A E z - b|| <= radius}`` by warm-started CGLS."""
    return cgls(forward_op, b, radius, u0=z, max_iterations=max_iterations)


def drip_step(forward_op, regularizer, b, radius, z, step, projection_iterations):
    """One projected-gradient step ``P(z - step grad R(z))`` (differentiable)."""
    moved = z - per_sample(step, z) * regularizer.gradient(z)
    return project(forward_op, b, radius, moved, projection_iterations)


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
    step_scale: float = 1.0,
    projection_iterations: int = 50,
    final_projection_iterations: int = 1000,
) -> DripSolution:
    """Solve the lower-level problem for a batch (see the module docstring).

    ``projection_iterations`` caps the CGLS projection inside each step;
    ``final_projection_iterations`` caps the CGLS runs that start (from zero) and end the solve.
    """
    forward_op = EmbeddedOperator(op, embedding)
    radius = radius.to(device=b.device, dtype=b.dtype)
    n = b.shape[0]
    step = (step_scale / regularizer.lipschitz_bound()).to(b.dtype).expand(n)
    if z0 is None:  # the discrepancy-principle CGLS solution in latent space: feasible
        z0 = cgls(forward_op, b, radius, max_iterations=final_projection_iterations).solution
    solution = z0.clone()
    iterations = torch.full((n,), max_iterations, dtype=torch.int64, device=b.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=b.device)
    rows = torch.arange(n, device=b.device)

    z, z_prev = z0, z0
    b_work, radius_work = b, radius
    momentum_t = torch.ones(n, dtype=b.dtype, device=b.device)
    for it in range(1, max_iterations + 1):
        t_next = (1 + torch.sqrt(1 + 4 * momentum_t**2)) / 2
        beta = (momentum_t - 1) / t_next
        y = z + per_sample(beta, z) * (z - z_prev)
        z_new = drip_step(forward_op, regularizer, b_work, radius_work, y, step[: len(rows)],
                          projection_iterations).solution
        against = ((y - z_new) * (z_new - z)).flatten(1).sum(1) > 0
        momentum_t = torch.where(against, torch.ones_like(t_next), t_next)
        change = (z_new - z).flatten(1).norm(dim=1) / z_new.flatten(1).norm(dim=1).clamp_min(1e-12)
        z_prev, z = torch.where(per_sample(against, z), z_new, z), z_new
        small = change <= tolerance
        done = small | (it == max_iterations)
        if bool(done.any()):  # retire finished samples; keep iterating on the rest only
            finished = rows[done]
            solution[finished], iterations[finished], stopped[finished] = z[done], it, small[done]
            keep = ~done
            rows = rows[keep]
            z, z_prev, momentum_t = z[keep], z_prev[keep], momentum_t[keep]
            b_work, radius_work = b_work[keep], radius_work[keep]
        if len(rows) == 0:
            break
    # Every iterate was projected, but a projection capped at projection_iterations may have
    # fallen short: the last word is a projection run to the tolerance.
    final = project(forward_op, b, radius, solution, final_projection_iterations)
    latent = final.solution
    return DripSolution(solution=embedding(latent), iterations=iterations + final.iterations,
                        converged=stopped & final.converged, latent=latent,
                        regularizer_value=regularizer.value(latent))
