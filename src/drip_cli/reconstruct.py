"""Reconstruct a whole measurement file: stream batches through a method, check the data fit of
every sample, and write the contract's reconstruction file atomically."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data.axis import axis_doubt
from .data.measured import field_of_view_doubt
from .errors import DripError
from .evaluation import psnr, ssim
from .io import MeasurementFile, ReconstructionWriter, atomic_h5, check_writable
from .methods import ReconstructionMethod, warn_if_each_channel_unused
from .runtime import configure_cpu
from .solvers import (discrepancy_radius, discrepancy_ratio, relative_residual, zero_fits,
                      zero_fits_warning)


# Samples solved together when the caller does not say. On the CPU a solve's cost per sample
# hardly depends on its batch (the blur sample model: 0.08-0.09 s per 64x64 image in batches of
# 64 and of 512), but its memory does, so larger images come in fewer at a time: at most
# CPU_BATCH_PIXELS values, 8 images of 256x256. The blur sample model's solve (both passes, run
# on 32 crops of 256x256 through the API, which lets a model meet another size) peaked at 1.6
# GB in one batch, 0.69-0.74 GB in batches of 8 and 0.51-0.53 GB in batches of 4, and took 70
# s in one batch, 65-70 in batches of 8 and 78-99 in batches of 4. On a GPU an iteration costs
# about the same whatever the batch, its kernels too small to fill the device and each ending
# in a host synchronisation, so larger batches are faster: on an H200, DRIP on the bench's
# crops went from 10.5 to 51 images/s on tomography (64 -> 512 in a batch, one run) and from 12
# to 31.5 on blur (another run). There the batch holds GPU_BATCH_PIXELS values: 512 images of
# 64x64, fewer of larger ones.
CPU_BATCH_SIZE, CPU_BATCH_PIXELS = 64, 8 * 256 * 256
GPU_BATCH_PIXELS = 512 * 64 * 64


def default_batch_size(device: torch.device, image_shape: tuple[int, ...]) -> int:
    """The batch size used when none is given, for images of ``image_shape`` ``(C, H, W)``."""
    pixels = math.prod(image_shape)
    if torch.device(device).type == "cpu":
        return max(1, min(CPU_BATCH_SIZE, CPU_BATCH_PIXELS // pixels))
    return max(1, GPU_BATCH_PIXELS // pixels)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. Also makes the process's
    CPU settings (:func:`drip_cli.runtime.configure_cpu`: denormals flushed, freed memory
    kept for reuse)."""
    configure_cpu()
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DripError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DripError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DripError(f"--device: unsupported device {name!r} (auto, cpu, cuda, cuda:N)")
    return device


def summarize(columns: dict[str, np.ndarray], tau: float) -> dict:
    """Aggregate figures of a reconstruction (the ``--report`` JSON and the console table)."""
    ratio = columns["discrepancy_ratio"]
    fits, solved = ratio <= tau, columns["solver_converged"].astype(bool)
    summary = {
        "n_samples": int(len(ratio)),
        "fit_fraction": float(np.mean(fits)),
        "n_unfit": int(np.sum(~fits)),
        "n_unfit_at_cap": int(np.sum(~fits & ~solved)),   # of those, the solver not converged
        # fit the data, but the solver stopped short of its minimiser: at its iteration cap, or
        # (drip) stalled where its projections cannot get more accurate (solvers.drip)
        "n_stopped_at_cap": int(np.sum(fits & ~solved)),
        "discrepancy_ratio_max": float(ratio.max()),
        "discrepancy_ratio_mean": float(ratio.mean()),
        "iterations_mean": float(np.mean(columns["iterations"])),
        # samples whose solver stopped by its own criterion, not at its cap or stalled
        "solver_converged_fraction": float(np.mean(solved)),
        "seconds_per_image": float(np.mean(columns["seconds"])),
        "regularizer_value_mean": (None if np.all(np.isnan(columns["regularizer_value"]))
                                   else float(np.nanmean(columns["regularizer_value"]))),
    }
    for name in ("psnr", "ssim"):
        if name in columns:
            summary[f"{name}_mean"] = float(np.mean(columns[name]))
    return summary


def reconstruct_batch(method: ReconstructionMethod, op, measurements: np.ndarray,
                      noise_std: np.ndarray, tau: float, ground_truth: np.ndarray | None = None,
                      device: str | torch.device = "cpu", progress=None) -> dict[str, np.ndarray]:
    """Solve one batch and measure it: the columns of the contract's reconstruction file
    (``reconstructions``, ``discrepancy_ratio``, ``relative_residual``, ``regularizer_value``,
    ``iterations``, ``converged``, and ``psnr``/``ssim`` with ground truth) plus
    ``solver_converged`` and ``seconds`` (per image, the batch's wall time shared out).
    ``progress(fraction)`` follows the solve (:meth:`ReconstructionMethod.solve`)."""
    device = torch.device(device)
    b = op.project_measurements(torch.from_numpy(measurements).to(device))
    sigma = torch.from_numpy(noise_std).to(device=device, dtype=b.dtype)
    start = time.perf_counter()
    result = method.solve(op, b, discrepancy_radius(op, sigma, tau), progress=progress)
    u = result.solution.detach()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(b)
    ratio = discrepancy_ratio(op, u, b, sigma).cpu().numpy()
    images = u.float().cpu().numpy()
    row = {
        "reconstructions": images,
        "discrepancy_ratio": ratio,
        "relative_residual": relative_residual(op, u, b).cpu().numpy(),
        "regularizer_value": (np.full(len(b), np.nan) if result.regularizer_value is None
                              else result.regularizer_value.detach().cpu().double().numpy()),
        "iterations": result.iterations.cpu().numpy(),
        "converged": ratio <= tau,
        "solver_converged": result.converged.cpu().numpy(),
        "seconds": np.full(len(b), seconds),
    }
    if ground_truth is not None:
        scored, truth = op.scored_part(images), op.scored_part(ground_truth)
        row["psnr"] = psnr(scored, truth)
        row["ssim"] = ssim(scored, truth)
    return row


def concatenate_rows(rows: list[dict]) -> dict:
    """The per-batch rows of :func:`reconstruct_batch` as one row over all samples."""
    return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}


def reconstruct_file(
    measurements_path: str | os.PathLike,
    out_path: str | os.PathLike,
    method: ReconstructionMethod,
    tau: float = 1.0,
    noise_std: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress=None,
    extra_attrs: dict | None = None,
    warn=warnings.warn,
    keep: dict | None = None,
    max_samples: int | None = None,
) -> dict:
    """Reconstruct every sample of ``measurements_path`` into ``out_path``; return the summary.

    ``progress(done, total)`` counts samples, also within a batch as the solver finishes them
    (``done`` may then be fractional); ``warn(message)`` receives the method's
    doubts about the data (a model used on another operator). The output appears only when every
    batch succeeded, and never replaces the measurements or the other files in ``keep``
    (``{what it is: path}``, e.g. the model; see :func:`drip_cli.io.check_writable`).
    ``max_samples``: only the first so many samples (the output records ``source_samples``).
    """
    device = torch.device(device)
    check_writable(out_path, keep={"the measurement file": measurements_path, **(keep or {})})
    with MeasurementFile(measurements_path, noise_std=noise_std) as data:
        extra_attrs = {**(extra_attrs or {}), **method.check(data, warn)}
        warn_if_each_channel_unused([method], data.image_shape[0], warn)
        n = data.n_samples if max_samples is None else min(data.n_samples, max_samples)
        if data.operator.kind == "tomography":   # an object wider than the image, or an axis
            first = data.read(0, min(n, 64)).measurements   # elsewhere: said first
            for doubt in (field_of_view_doubt(data.operator, first),
                          axis_doubt(data.operator, first)):
                if doubt is not None:
                    warn(doubt)
        op = data.operator.to(device)
        attrs = {"method": method.name, "tau": float(tau),
                 "source_file": str(Path(measurements_path).resolve()),
                 "drip_version": __version__, "operator_kind": op.kind, **extra_attrs}
        if noise_std is not None:   # the ratios are against it, not the file's noise levels
            attrs["noise_std"] = float(noise_std)
        if n < data.n_samples:   # which of the source's samples these are
            attrs["source_samples"] = f"0:{n}"
        with atomic_h5(out_path) as handle:
            writer = ReconstructionWriter(handle, n, data.image_shape, data.has_ground_truth, attrs)
            if progress is not None:   # the total, before the first batch takes its time
                progress(0, n)
            batch_size = batch_size or default_batch_size(device, data.image_shape)
            unconstrained = 0   # samples whose data fit the zero image fits
            for batch in data.batches(batch_size, n):
                radius = discrepancy_radius(data.operator, torch.from_numpy(batch.noise_std), tau)
                measured = torch.from_numpy(batch.measurements)
                unconstrained += int(zero_fits(data.operator, measured, radius).sum())
                within = None if progress is None else \
                    (lambda f, b=batch: progress(b.start + f * (b.stop - b.start), n))
                row = reconstruct_batch(method, op, batch.measurements, batch.noise_std, tau,
                                        batch.ground_truth, device, within)
                writer.write(batch.start, **row)
                if progress is not None:
                    progress(batch.stop, n)
            # read back rather than kept batch by batch: small arrays kept alive between the
            # batches' large temporaries fragment the heap, and memory grew with the file
            # (by 30 MB per 1000 images of 64x64)
            columns = writer.columns()
        if unconstrained:
            warn(zero_fits_warning(unconstrained, n, tau))
    summary = {"file": str(measurements_path), "output": str(out_path), "method": method.name,
               "tau": float(tau), "operator_kind": op.kind,
               **({} if noise_std is None else {"noise_std": float(noise_std)}),
               **summarize(columns, tau)}
    return summary
