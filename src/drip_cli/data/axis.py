"""Where a tomography scan's rotation axis meets the detector line, from the sinograms alone.

In parallel-beam geometry the projection at angle ``theta`` of an object with mass ``m`` and
centre of mass ``(x, y)`` has the same mass at every angle, and its centre of mass on the
detector line is ``c(theta) = c0 + x cos(theta) + y sin(theta)``, where ``c0`` is the detector
the axis projects onto: the first two of the Helgason-Ludwig consistency conditions, which
drip's Radon transform keeps to within 0.03 detectors (bilinear interpolation). A least-squares
fit of the three terms to a sinogram's centres of mass gives ``c0``; the median over the
sinograms (samples times channels) is the estimate, any angular range of at least a few angles
(the cosine and sine tell the axis from the object's centre less well as the range narrows,
which the uncertainty shows).

It holds only where every projection sees the whole object and nothing else: a sinogram whose
mass changes with the angle by more than noise (an object wider than the detector, a drifting
background) is not used. On 32 photo crops (64x64, 32 angles over 120 degrees, 2% noise) an axis
0.1 detectors off cost the tomography model 0.8 dB, 0.25 off 8.4 dB (3 crops of 32 unable to fit),
1.7 off (the axis taken for centred) left 30 of 32 unable to fit; so an estimate is used only
when it is certain to ``AXIS_TOLERANCE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..operators.tomography import Tomography

# an estimate is used, or a given axis doubted, only when its standard error is at most this
# many detectors (the module docstring)
AXIS_TOLERANCE = 0.1
# a sinogram is used when its rows' masses vary by at most this fraction of their mean beyond
# what its noise explains: 1% let windows of 81 detectors (of a 64x64 image's 91) through with
# errors up to 0.33 detectors; at 0.25% every estimate used was within max(0.1, 3 standard
# errors) of the truth (design.md)
MASS_SPREAD = 0.0025
MIN_ANGLES = 5   # three terms to fit, and two rows more to measure the misfit with


@dataclass
class AxisEstimate:
    """The axis's detector from the detector line's centre (``D // 2``), as ``center_offset``."""

    offset: float          # median over the sinograms used
    uncertainty: float     # its standard error (the fits' and the sinograms' spread, the larger)
    used: int              # sinograms that see their whole object
    total: int

    def attrs(self) -> dict:
        """The measurement file's record of it (root attributes)."""
        return {"center_offset_from": "estimated from the sinograms' centres of mass",
                "center_offset_uncertainty": self.uncertainty,
                "center_offset_sinograms": f"{self.used} of {self.total}"}

    def describe(self) -> str:
        return (f"{self.offset:.2f} ± {self.uncertainty:.2g} detectors, from the centres of "
                f"mass of {self.used} of {self.total} sinograms")


def _rows_mass_steady(mass: np.ndarray) -> np.ndarray:
    """Whether each sinogram's row masses (``(K, A)``, rows in angle order) keep to one value
    within noise: their spread beyond the noise that second differences show, as a fraction of
    their mean, at most ``MASS_SPREAD``."""
    with np.errstate(all="ignore"):   # huge values: not finite, so not steady
        mean = mass.mean(axis=1)
        second = mass[:, 2:] - 2 * mass[:, 1:-1] + mass[:, :-2]
        noise = np.median(np.abs(second), axis=1) / 0.6745 / np.sqrt(6)
        excess = np.sqrt(np.maximum(mass.var(axis=1) - noise ** 2, 0))
        return (mass.min(axis=1) > 0) & (excess <= MASS_SPREAD * mean)


def _row_moments(sinograms, chunk: int = 64):
    """Each row's mass and first moment (``sum_t p(t)``, ``sum_t t p(t)``; ``(K, A)`` for the
    ``K`` sinograms, 0 where one holds a value that is not finite), in float64, and which
    sinograms are finite; ``chunk`` samples (entries of the first axis) at a time, so that a
    large scan is not copied whole, nor read whole where ``sinograms`` is an HDF5 dataset."""
    rows, detectors = sinograms.shape[-2:]
    stack = sinograms if len(sinograms.shape) > 2 else np.asarray(sinograms)[None]
    per_sample = int(np.prod(stack.shape[1:-2], dtype=np.int64))   # sinograms per sample
    positions = np.arange(detectors, dtype=np.float64)
    mass = np.zeros((len(stack) * per_sample, rows))
    moment = np.zeros_like(mass)
    finite = np.zeros(len(mass), dtype=bool)
    with np.errstate(all="ignore"):   # huge values: not finite, so not steady
        for start in range(0, len(stack), chunk):
            block = np.asarray(stack[start:start + chunk], dtype=np.float64)
            block = block.reshape(-1, rows, detectors)
            kept = slice(start * per_sample, start * per_sample + len(block))
            ok = np.isfinite(block).all(axis=(1, 2))
            finite[kept] = ok
            mass[kept][ok] = block[ok].sum(axis=2)
            moment[kept][ok] = block[ok] @ positions
    return mass, moment, finite


def estimate_axis(sinograms: np.ndarray, angles_deg: np.ndarray) -> AxisEstimate | str:
    """The axis of ``sinograms`` (``(..., A, D)``, row ``a`` at ``angles_deg[a]``; an array,
    or an HDF5 dataset read a block at a time), or why it cannot be estimated from them (a
    sentence)."""
    angles = np.asarray(angles_deg, dtype=np.float64)
    if len(np.unique(np.mod(angles, 360))) < MIN_ANGLES:
        return f"it needs at least {MIN_ANGLES} different angles"
    order = np.argsort(angles, kind="stable")
    theta = np.deg2rad(angles[order])
    mass, moment, finite = _row_moments(sinograms)
    mass, moment = mass[:, order], moment[:, order]
    used = np.flatnonzero(finite & _rows_mass_steady(mass))
    if len(used) == 0:
        return ("no sinogram keeps its mass from angle to angle (an object wider than the "
                "detector sees, a background, or data that are not line integrals)")
    design = np.stack([np.ones_like(theta), np.cos(theta), np.sin(theta)], axis=1)
    variance_factor = np.linalg.pinv(design.T @ design)[0, 0]
    with np.errstate(all="ignore"):   # extreme values: caught as not finite below
        centre = moment[used] / mass[used]                                            # (K, A)
        fit = np.linalg.pinv(design) @ centre.T                                       # (3, K)
        misfit = ((centre.T - design @ fit) ** 2).sum(axis=0) / (len(theta) - 3)
        offsets = fit[0] - sinograms.shape[-1] // 2
        errors = np.sqrt(misfit * variance_factor)
        # the median's standard error: the fits' own, or the sinograms' spread where there
        # are enough of them to measure it, whichever is larger
        uncertainty = float(np.median(errors) / np.sqrt(len(used)))
        if len(used) >= 4:
            spread = 1.4826 * np.median(np.abs(offsets - np.median(offsets)))
            uncertainty = max(uncertainty, 1.2533 * float(spread) / np.sqrt(len(used)))
        offset = float(np.median(offsets))
    if not (np.isfinite(offset) and np.isfinite(uncertainty)):   # masses below float's reach
        return "its centres of mass are not finite numbers"
    return AxisEstimate(offset, uncertainty, len(used), len(mass))


# a given axis is doubted when the estimate lies more than this many detectors from it (and
# more than three of its standard errors): the estimate's own error was 0.02 on 32 photo crops
MISPLACED_AXIS = 0.1


def axis_doubt(op, b: np.ndarray) -> str | None:
    """For tomography, a warning where the sinograms ``b`` turn about another detector than the
    operator's axis, by more than ``MISPLACED_AXIS`` and with an estimate certain to
    ``AXIS_TOLERANCE``."""
    if not isinstance(op, Tomography):
        return None
    estimate = estimate_axis(b, op.angles_deg)
    if isinstance(estimate, str) or estimate.uncertainty > AXIS_TOLERANCE:
        return None
    given = op.center_offset
    if not abs(estimate.offset - given) > max(MISPLACED_AXIS, 3 * estimate.uncertainty):
        return None
    middle = op.n_detectors // 2
    return (f"the sinograms turn about detector {middle + estimate.offset:.2f} (center offset "
            f"{estimate.describe()}), not about detector {middle + given:g}, where the operator "
            f"puts the rotation axis (center offset {given:g}): on drip's photo crops an axis 0.1 "
            "detectors off cost 0.8 dB, 0.25 off 8 dB, and 1.7 off left data no image could "
            f"fit; import the measurements with --center-offset auto (or {estimate.offset:.2f})")
