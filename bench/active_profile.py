"""Where a DRIP solve spends its time, by the number of samples still active.

    usage: python bench/active_profile.py {blur,tomography} DEVICE N

Solves N bench crops (the bench's photographs, 2% noise) in one batch with the sample model of
that operator, timing every solver step (synchronised on a GPU), and prints the time and the
milliseconds per iteration for each range of active samples, and what the solve would take if
every sample-iteration cost what it costs with the batch at least 60% full: the most that
refilling the batch as samples finish could save. It also splits the solve into its parts,
each timed synchronised (so the parts are the device's time too, not only the launches): the
gradient of ``R``, the projections inside the steps, the host processor's share of those (the
small subspace problems), the CGLS runs that start and end each pass, and the rest (momentum,
stopping tests, the reweighting map), and counts the Krylov steps of the projections in the
steps (:mod:`drip_cli.solvers.projection`). Last, the same solve runs again, every batch size met
before: on a GPU the first solve paid for cuDNN's planning of each new shape, which padding the
convolutions' batches removed (``drip_cli.operators.convolution``), so the two should now agree.
The figures of the README's GPU paragraph come from it.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "src")]
import bench  # noqa: E402
import drip_cli.solvers.drip as drip_solver  # noqa: E402
import drip_cli.solvers.projection as projection  # noqa: E402
from drip_cli.data import SourceOptions, load_images  # noqa: E402
from drip_cli.methods import LearnedMethod  # noqa: E402
from drip_cli.reconstruct import resolve_device  # noqa: E402
from drip_cli.solvers import discrepancy_radius  # noqa: E402


def main() -> None:
    kind, device, n = sys.argv[1], resolve_device(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    options = SourceOptions(channels=1, crop_size=64, crops_per_image=max(1, n // 4))
    truth = load_images("skimage:camera,coffee,astronaut,chelsea", options,
                        np.random.default_rng(0))
    op, b, sigma = bench.measured(bench.tomography() if kind == "tomography" else bench.blur(), truth)
    op, b = op.to(device), b.to(device)
    radius = discrepancy_radius(op, sigma.to(device), 1.0)
    method = LearnedMethod.load(bench.SAMPLES / f"drip_{kind}.safetensors")
    log = []
    step = drip_solver._backtracking_step

    def timed(*args, **kwargs):   # args[4]: the active samples' y
        bench.synchronize(device)
        start = time.perf_counter()
        out = step(*args, **kwargs)
        bench.synchronize(device)
        log.append((len(args[4]), time.perf_counter() - start))
        return out

    drip_solver._backtracking_step = timed
    parts = {}

    def phase(owner, name: str, label: str) -> None:
        """Time every call of ``owner.name`` (synchronised) under ``label``."""
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):
            bench.synchronize(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            bench.synchronize(device)
            seconds, calls = parts.get(label, (0.0, 0))
            parts[label] = (seconds + time.perf_counter() - start, calls + 1)
            return out

        setattr(owner, name, wrapped)

    regularizer = method.model.regularizer
    order = ["gradient of R", "projections in the steps", "  of which subspace problems (host)",
             "CGLS runs (start and end of each pass)"]
    phase(regularizer, "gradient", "gradient of R")
    phase(regularizer, "value_and_gradient", "gradient of R")
    krylov = []   # the Krylov steps of every sample's projection in the steps
    project = drip_solver.project_onto_datafit

    def counted(*args, **kwargs):
        z, steps = project(*args, **kwargs)
        krylov.append(steps.cpu())
        return z, steps

    drip_solver.project_onto_datafit = counted
    phase(drip_solver, "project_onto_datafit", "projections in the steps")
    phase(projection, "_tikhonov_in_subspace", "  of which subspace problems (host)")
    phase(drip_solver, "cgls", "CGLS runs (start and end of each pass)")
    method.solve(op, b[:2], radius[:2])   # warm-up
    log.clear()
    parts.clear()
    krylov.clear()
    bench.synchronize(device)
    start = time.perf_counter()
    method.solve(op, b, radius)
    bench.synchronize(device)
    total = time.perf_counter() - start
    active, seconds = np.array(log).T
    print(f"{kind}, {len(b)} crops on {device}: {total:.2f} s ({len(b) / total:.1f} images/s), "
          f"steps {seconds.sum():.2f} s over {len(log)} iterations")
    for lo, hi in [(1, 4), (5, 9), (10, 19), (20, 39), (40, 99), (100, 10**9)]:
        rows = (active >= lo) & (active <= hi)
        if rows.any():
            print(f"  {lo}-{hi if hi < 10**9 else ''} active: {rows.sum()} iterations, "
                  f"{seconds[rows].sum():.2f} s, {1e3 * seconds[rows].mean():.2f} ms each")
    full = active >= 0.6 * active.max()
    rate = seconds[full].sum() / active[full].sum()
    print(f"  {active.sum():.0f} sample-iterations; at the full batch's rate "
          f"({1e3 * rate:.3f} ms each) {active.sum() * rate:.2f} s")
    print("where the time goes:")
    inside = sum(seconds for label, (seconds, _) in parts.items() if not label.startswith(" "))
    for label, (seconds, calls) in sorted(parts.items(), key=lambda item: order.index(item[0])):
        print(f"  {label}: {seconds:.2f} s in {calls} calls ({1e3 * seconds / calls:.2f} ms each)")
    print(f"  the rest: {total - inside:.2f} s")
    steps = torch.cat(krylov)
    steps = steps[steps > 0]   # samples inside the set already take none
    print(f"Krylov steps per projection of a sample: {steps.double().mean():.2f} on average, "
          f"one step for {(steps == 1).double().mean():.0%}")
    # the same solve again, every working-set size met before (on a GPU: cuDNN's plans cached)
    bench.synchronize(device)
    start = time.perf_counter()
    method.solve(op, b, radius)
    bench.synchronize(device)
    print(f"the same solve again: {time.perf_counter() - start:.2f} s (first: {total:.2f} s)")


if __name__ == "__main__":
    main()
