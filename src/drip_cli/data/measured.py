"""Measurements users took themselves (``drip import``): read, given an operator and a noise
level, and written as a measurement file (CONTRACT.md), with the true images where the user
has them (``reconstruct`` then reports PSNR and SSIM).

The measurements come as

- PNG, JPEG or TIFF pictures, one file or a folder of them (one sample each, or each page of a
  multi-page TIFF, all of one size; 8-bit or 16-bit grayscale scaled to [0, 1], 32-bit float
  TIFFs kept, as ``drip simulate`` reads pictures), for the operators whose measurements are
  images (denoise, blur, inpainting), and sinograms as 32-bit float TIFFs (an 8- or 16-bit
  picture would be read as an image scaled to [0, 1], so it is refused for them);
- a ``.npy`` array (``numpy.save``, read without pickle) for any operator: ``S``, ``(N, *S)`` or
  ``(N, C, *S)`` with ``S`` the operator's measurement shape (``(H, W)`` for images, ``(n_angles,
  n_detectors)`` for a sinogram, ``(m,)`` for a sparse matrix's rows).

The operator is built from the options ``drip simulate`` takes, the image's shape from the
measurements' (a valid blur's larger by its PSF's size less one, a sinogram's from its
detectors, a square matrix's columns from their number), or copied with its image shape from a
measurement file (``like``): any operator, a non-square one included. An inpainting mask is a
picture or ``.npy`` array (non-zero = observed).

The discrepancy principle needs each sample's noise level ``sigma``: given (``noise_std``),
a percent of the measurements' mean magnitude (``noise_percent``; the contract's percent is of
``mean |A x|``, which ``mean |b|`` approximates while the noise is small), or estimated
(:func:`estimate_noise_std`: from what the operator removes, or for denoise and inpainting from
the image's statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DripError, DripWarning, require_regular_file
from ..io import MeasurementFile, MeasurementWriter, atomic_h5
from ..io.datasets import (DATASET_SEPARATOR, is_dataset_source, names_dataset, split_dataset,
                          subset_index)
from ..io.measurements import (first_sample_where, overflows_float32,
                               require_representable_radius, require_resolvable_noise)
from ..operators import (IMAGE_MEASUREMENT_KINDS, Blur, Denoise, Inpainting, LinearOperator,
                         SparseMatrixOperator, Tomography)
from ..operators.tomography import radon_geometry
from ..solvers import discrepancy_radius, zero_fits, zero_fits_warning
from .axis import AXIS_TOLERANCE, AxisEstimate, axis_doubt, estimate_axis
from .simulate import (OperatorSpec, build_operator, matrix_operator, read_array,
                       tomography_angles)
from .sources import (IMAGE_SUFFIXES, PICTURES, _as_float32, _to_channels, picture_paths,
                      iter_pictures, picture_sizes)

# The noise estimate reads the measurement components in which the operator keeps less than
# this share of the image (relative to its largest gain), and needs at least ESTIMATE_MIN_COUNT
# of them per sample: the estimate's relative standard error is 1 / sqrt(2 dof), with two real
# degrees of freedom in each of a blur's complex Fourier coefficients (3.1% at 256) and one in
# each of a sparse matrix's components (4.4% at 256; NoiseEstimate). Measured on 64 crops of
# four photographs blurred with sigma 2 (1551 such components): estimate / true sigma
# 0.97-1.04 at 1-5% noise, 0.97-1.16 at 0.03%; at a threshold of 1e-2 the image's own
# leftovers raised the estimate up to 3-fold at 0.03%.
ESTIMATE_GAIN = 1e-3
ESTIMATE_MIN_COUNT = 256
# A sparse matrix's weak components come from the eigenvectors of its smaller Gram matrix up to
# this side: 1.7 s for the 2912 rows of 64x64 limited-angle tomography (32 angles), 14 s for
# the 5824 of 128x128, on the 2-core machine. Beyond, only the matrix's zero rows are read.
SPECTRAL_LIMIT = 6000


@dataclass
class NoiseChoice:
    """How the noise level is set: exactly one of the three."""

    noise_std: float | None = None
    noise_percent: float | None = None
    estimate: bool = False

    def check(self) -> None:
        given = [self.noise_std is not None, self.noise_percent is not None, self.estimate]
        if sum(given) != 1:
            raise DripError("give the noise level in exactly one way: --noise-std S (its "
                            "standard deviation, intensities in [0, 1]), --noise-percent P, or "
                            "--estimate-noise")
        for option, value in (("--noise-std", self.noise_std),
                              ("--noise-percent", self.noise_percent)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DripError(f"{option} must be a positive number, got {value:g}")

    @property
    def how(self) -> str:
        return ("given" if self.noise_std is not None else
                "percent of mean |b|" if self.noise_percent is not None else "estimated")


def _picture_subset(paths: list[Path], subset: tuple[int, slice] | None,
                    source: Path) -> tuple[list[range | None], slice | None]:
    """Which frames of each picture file, and which rows of each frame, the slices
    ``subset`` of the pictures read as ``(N, C, H, W)`` keep (``--slices``: axis 0, the
    samples, or -2, the rows), so that only they are decoded and kept."""
    frames: list[range | None] = [None] * len(paths)
    if subset is None:
        return frames, None
    axis, kept = subset
    if axis % 4 not in (0, 2):
        raise ValueError(f"--slices of pictures pick samples or rows, not axis {axis}")
    sizes = [picture_sizes(path) for path in paths]
    if axis % 4 == 2:   # the rows of every frame, which must then be the same rows of each
        first = sizes[0][0]
        for path, size in ((path, size) for path, own in zip(paths, sizes) for size in own):
            if size != first:
                raise DripError(f"is {size[0]}x{size[1]}, where {paths[0].name} is "
                                f"{first[0]}x{first[1]}: the measurements of one file must "
                                "share their shape", path)
        subset_index((1, 1, *first), subset, source)   # refuses a slice that keeps none
        return frames, kept
    total = sum(map(len, sizes))
    subset_index((total, 1, 1, 1), subset, source)   # refuses a slice that keeps none
    wanted, start = range(total)[kept], 0   # (START:STOP: a step of 1)
    for i, own in enumerate(sizes):   # each file's share, counted in the file
        low, high = max(wanted.start, start), min(wanted.stop, start + len(own))
        frames[i] = range(low - start, max(low, high) - start)
        start += len(own)
    return frames, None


def _pictures(paths: list[Path], channels: int | None, floats_only: bool = False,
              scaled: bool = True, subset: tuple[int, slice] | None = None,
              source: Path | None = None) -> np.ndarray:
    """One sample per picture, or per frame of a multi-page TIFF. ``floats_only``: the
    measurements are not images (a sinogram), so only 32-bit float pictures, whose values are
    kept, can hold them; 8- and 16-bit ones are read as images scaled to [0, 1], unless not
    ``scaled`` (a detector's counts, kept as they are). ``subset``: only those slices
    (:func:`_picture_subset`), the only frames decoded."""
    frames, rows = _picture_subset(paths, subset, source)
    images, first = [], None   # (the file of the first image read)
    for path, kept in zip(paths, frames):
        if kept is not None and not kept:
            continue
        for picture in iter_pictures(path, frames=kept, rows=rows):
            if floats_only and picture.dtype != np.float32:
                raise DripError(f"holds {8 * picture.dtype.itemsize}-bit integers, which drip "
                                "reads as images scaled to [0, 1]; these measurements are not "
                                "images: give them as a 32-bit float TIFF, a .npy array or "
                                "an HDF5 dataset", path)
            own = 3 if picture.ndim == 3 else 1
            try:
                image = _to_channels(picture, channels or own, scaled)
            except ValueError as exc:
                raise DripError(str(exc), path) from exc
            if images and image.shape != images[0].shape:
                raise DripError(f"is {image.shape[1]}x{image.shape[2]} with {image.shape[0]} "
                                f"channel(s), where {first.name} is {images[0].shape[1]}x"
                                f"{images[0].shape[2]} with {images[0].shape[0]}: the "
                                "measurements of one file must share their shape", path)
            images.append(image)
            first = first or path
    return np.stack(images)


def _is_array(source: Path) -> bool:
    return is_dataset_source(source) or source.suffix.lower() == ".npy"


def _array(source: Path, rank: int, what: str = "measurements", scaled: bool = True,
           subset: tuple[int, slice] | None = None) -> np.ndarray:
    """A ``.npy`` file or an HDF5 dataset (``FILE::DATASET``) as ``(N, C, *S)`` float32,
    ``rank = len(S)`` (8- and 16-bit integers scaled to [0, 1] where ``scaled``; of the
    stored array, only the slices ``subset`` keeps: :func:`read_array`)."""
    values = read_array(source, what, subset=subset)
    shapes = {rank: "S", rank + 1: "(N, *S)", rank + 2: "(N, C, *S)"}
    if values.ndim not in shapes:
        raise DripError(f"has shape {values.shape}; expected {', '.join(shapes.values())}, S "
                        f"the shape of one channel's {what} ({rank} axes)", source)
    if values.ndim == rank:
        values = values[None, None]
    elif values.ndim == rank + 1:
        values = values[:, None]
    elif values.shape[1] not in (1, 3):
        raise DripError(f"has shape {values.shape}: read as (N, C, *S), its C = "
                        f"{values.shape[1]} channels is neither 1 nor 3", source)
    if 0 in values.shape:
        raise DripError(f"has shape {values.shape}, which holds no values", source)
    return _as_float32(values, scaled)


def read_measured(source: Path, rank: int, channels: int | None = None,
                  images: bool = True, what: str = "measurements",
                  counts: bool = False, subset: tuple[int, slice] | None = None) -> np.ndarray:
    """The measurements (or ``what`` else) at ``source`` as ``(N, C, *S)`` float32; ``rank =
    len(S)``; ``images``: whether they are images, which any picture may hold (other
    measurements of two axes, a sinogram, only a 32-bit float TIFF). ``channels`` converts
    pictures (colour to grayscale or back); arrays keep their own. ``counts``: a detector's
    counts, which pictures and arrays of any type hold, their values kept as they are.
    ``subset``: only those slices (``(axis, slice)``, of the array as stored, or of the
    pictures read as ``(N, C, H, W)``; ``--slices``)."""
    expected = (f"a .npy array, an HDF5 dataset (FILE{DATASET_SEPARATOR}DATASET), a "
                f"{PICTURES} picture or a folder of them")
    if not (names_dataset(source) or source.exists()):   # (FILE::DATASET: the reader's)
        raise DripError("no such file or folder", source)
    require_regular_file(split_dataset(source)[0], expected)
    if _is_array(source):
        values = _array(source, rank, what, scaled=not counts, subset=subset)
        if channels is not None and channels != values.shape[1]:
            raise DripError(f"holds {values.shape[1]} channel(s); --channels converts pictures "
                            "only", source)
    elif source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        if not images and rank != 2:
            raise DripError("pictures hold images, and this operator's measurements are not "
                            "images: give them as a .npy array or an HDF5 dataset", source)
        values = _pictures(picture_paths(source), channels, floats_only=not (images or counts),
                           scaled=not counts, subset=subset, source=source)
    else:
        raise DripError(f"expected {expected}", source)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DripError(f"{what} contain NaN or Inf ({first_sample_where(bad, 0)})", source)
    if overflows_float32(values):
        raise DripError(f"the {what} are too large for float32 arithmetic (scale them to the "
                        "images' range, [0, 1])", source)
    return values


def _tomography_side(detectors: int) -> int:
    """The side of the square images whose sinograms have ``detectors`` detectors."""
    for side in range(max(1, int(detectors / math.sqrt(2)) - 2), detectors + 1):
        if radon_geometry(side, side)[0] == detectors:
            return side
    raise DripError(f"no square image has sinograms of {detectors} detectors in drip's "
                    "geometry (scikit-image's radon, circle=False): give the image's side with "
                    "--image-size N (the detectors then measure a centred window), or the "
                    "operator with --like FILE.h5")


def _estimated_axis(spec: OperatorSpec, b: np.ndarray, source: Path) -> AxisEstimate | None:
    """``--center-offset auto``: the rotation axis of the sinograms ``b`` at the angles of
    ``spec`` (angles defaulted), or None where those angles are wrong (a message from
    building the operator then follows); a ``DripError`` where it cannot be estimated or is not
    certain to ``AXIS_TOLERANCE``."""
    try:
        angles = tomography_angles(spec)
    except ValueError:
        return None
    if len(angles) != b.shape[-2]:
        return None
    estimate = estimate_axis(b, angles)
    hint = "give it with --center-offset D (detectors from the detector line's centre)"
    if isinstance(estimate, str):
        raise DripError(f"cannot estimate the rotation axis from the sinograms: {estimate}; "
                        f"{hint}", source)
    if estimate.uncertainty > AXIS_TOLERANCE:
        raise DripError(f"the rotation axis estimated from the sinograms, center offset "
                        f"{estimate.describe()}, is too uncertain to use (an axis 0.1 "
                        f"detectors off cost 0.8 dB on drip's photo crops): {hint}", source)
    return estimate


def measured_operator(spec: OperatorSpec | None, like: LinearOperator | None,
                      shape: tuple[int, ...]) -> LinearOperator:
    """The operator of measurements of shape ``(C, *S)``: ``like`` (a measurement file's), or
    built from ``spec`` with the image shape the measurements imply (inpainting: from its
    ``mask_file``). Its measurement shape is checked against theirs."""
    channels, measured = shape[0], tuple(shape[1:])
    if like is not None:
        op = like
    elif spec.kind == "matrix":
        op = matrix_operator(spec.matrix_file, (channels,))
    elif spec.kind == "inpainting" and spec.mask_file is None:
        raise DripError("inpainting needs the mask of observed pixels: --mask FILE (a picture "
                        "or .npy array, non-zero = observed)")
    elif spec.kind == "tomography":   # (its angles given, or one per row: import's)
        try:
            angles = len(tomography_angles(spec))
        except ValueError:   # wrong options: building the operator below says which
            angles = measured[-2]
        if angles != measured[-2]:   # before the operator is built (seconds for a large one)
            rows = f"where the sinograms have {measured[-2]} rows, one per angle"
            if spec.angle_file is not None:
                raise DripError(f"holds {angles} angles, {rows}", spec.angle_file)
            raise DripError(f"--angles {angles}, {rows}: leave --angles out to take one angle "
                            "per row")
        # the detectors are the sinogram's; the image the square they span, or the one given
        side = spec.image_side or _tomography_side(measured[-1])
        op = build_operator(dataclasses.replace(spec, detectors=measured[-1]),
                            (channels, side, side), np.random.default_rng())
    elif spec.kind == "blur" and spec.blur_boundary == "valid":
        # the scene the pixels saw is larger by the PSF's size less one: the PSF first (read
        # once), from the periodic blur of the measurements' own size
        psf = build_operator(dataclasses.replace(spec, blur_boundary="periodic"),
                             (channels, *measured), np.random.default_rng()).psf
        op = Blur((channels, measured[0] + psf.shape[0] - 1, measured[1] + psf.shape[1] - 1),
                  psf.numpy(), "valid")
    else:
        op = build_operator(spec, (channels, *measured), np.random.default_rng())
    if tuple(op.measurement_shape) != tuple(shape):
        raise DripError(f"the measurements are shaped {tuple(shape)} (C, *S), where the "
                        f"{op.kind} operator measures {tuple(op.measurement_shape)}")
    return op


@dataclass
class NoiseEstimate:
    """Each sample's estimated noise std, and what it rests on: the number of real degrees of
    freedom (independent Gaussian terms) it averages, its relative standard error ``1 /
    sqrt(2 dof)``, where the operator removes components of the measurements; or, where the
    measurements are the image's own pixels, the number of patches of weak texture it read
    (the fewest of any sample; :func:`_patch_noise_std`)."""

    std: np.ndarray
    dof: int | None = None
    patches: int | None = None

    @property
    def relative_error(self) -> float:
        return 1 / math.sqrt(2 * self.dof)

    def basis(self) -> str:
        """What the estimate rests on, in words."""
        if self.dof is not None:
            return (f"{self.dof} degrees of freedom (standard error "
                    f"{100 * self.relative_error:.1f}%)")
        return (f"image statistics: {self.patches} weak-texture patches (the fewest of a "
                "sample); fine texture reads as noise")

    def attrs(self) -> dict:
        """The measurement file's attributes that record it."""
        if self.dof is not None:
            return {"noise_estimate_dof": self.dof}
        return {"noise_estimate_patches": self.patches}


def _blur_noise_std(psf: torch.Tensor, b: np.ndarray, channels: int,
                    tapered: bool) -> NoiseEstimate:
    """Each sample's noise std from the Fourier coefficients of ``b`` where the PSF's gain on
    its grid is weak (:func:`estimate_noise_std`), ``tapered`` by a Hann window or not. Each
    complex coefficient holds two real degrees of freedom."""
    grid = Blur((1, *b.shape[-2:]), psf.numpy())
    gain = torch.view_as_complex(grid.transfer.contiguous()).abs().numpy()
    weak = gain < ESTIMATE_GAIN * gain.max()
    values, scale, share = b.astype(np.float64), 1.0, 1.0
    if tapered:
        window = np.outer(*(np.hanning(n + 2)[1:-1] for n in b.shape[-2:]))
        values = (values - values.mean(axis=(-2, -1), keepdims=True)) * window
        scale = float(np.mean(window ** 2))
        # the taper mixes neighbouring frequencies: as many independent ones as this share
        share = scale ** 2 / float(np.mean(window ** 4))
    count = int(int(weak.sum()) * channels * share)
    if count < ESTIMATE_MIN_COUNT:
        raise _too_few("blur", count)
    power = np.abs(np.fft.rfft2(values, norm="ortho")[..., weak]) ** 2
    return NoiseEstimate(
        np.sqrt(power.reshape(len(b), -1).mean(axis=1) / scale).astype(np.float32), 2 * count)


def _too_few(what: str, count: int) -> DripError:
    return DripError(f"this {what} keeps more than {ESTIMATE_GAIN:g} of its peak gain in all "
                     f"but {count} (independent) components of the measurements (at least "
                     f"{ESTIMATE_MIN_COUNT} are needed to tell the noise from the image): give "
                     "--noise-std or --noise-percent")


def _too_few_zero_rows(what: str, count: int, side: int) -> DripError:
    return DripError(f"this {what} is too large for its spectrum to be computed (its smaller "
                     f"side {side} is over {SPECTRAL_LIMIT}), and it has {count} zero rows, the "
                     f"measurements it ignores (at least {ESTIMATE_MIN_COUNT} are needed to tell "
                     "the noise from the image): give --noise-std or --noise-percent")


def _sparse_noise_std(op: SparseMatrixOperator, b: np.ndarray) -> NoiseEstimate:
    """Each sample's noise std from its components along the left singular vectors of the
    operator's matrix ``A`` whose singular value is below ``ESTIMATE_GAIN`` of the largest, its
    left null space included (:func:`estimate_noise_std`). They come from the eigenvectors of
    the smaller Gram matrix, ``A A^T`` or ``A^T A``, while it is at most ``SPECTRAL_LIMIT`` on a
    side; for larger matrices only the null space that costs nothing to find is read: the rows
    of ``A`` that are zero (a sinogram's detectors that no ray through the image reaches)."""
    matrix = op.scipy_matrix()
    rows, cols = matrix.shape
    values = b.astype(np.float64).reshape(len(b), -1, rows)   # (N, C, m)
    if min(rows, cols) <= SPECTRAL_LIMIT:
        wide = rows <= cols
        gram = torch.from_numpy((matrix @ matrix.T if wide else matrix.T @ matrix).toarray())
        eigenvalues, vectors = (t.numpy() for t in torch.linalg.eigh(gram))
        strong = eigenvalues >= ESTIMATE_GAIN ** 2 * eigenvalues.max()
        # the components along the strong left singular vectors: the eigenvectors u of A A^T,
        # or A v / s for those of A^T A, whose products with b are v^T A^T b / s
        along = (values @ vectors[:, strong] if wide else
                 (matrix.T @ values.reshape(-1, rows).T).T.reshape(*values.shape[:2], cols)
                 @ (vectors[:, strong] / np.sqrt(eigenvalues[strong])))
        count = rows - int(strong.sum())
        power = np.square(values).sum(axis=(1, 2)) - np.square(along).sum(axis=(1, 2))
    else:
        null = op.zero_rows()
        count = int(null.sum())
        power = np.square(values[..., null]).sum(axis=(1, 2))
    count *= values.shape[1]
    if count < ESTIMATE_MIN_COUNT:
        what = op.kind + " operator"
        raise (_too_few(what, count) if min(rows, cols) <= SPECTRAL_LIMIT
               else _too_few_zero_rows(what, count, min(rows, cols)))
    return NoiseEstimate(np.sqrt(np.maximum(power, 0) / count).astype(np.float32), count)


# Denoise and inpainting measure the image's own pixels: no component holds the noise alone, so
# their estimate reads the image's statistics (_patch_noise_std), after Liu, Tanaka & Okutomi
# (2013): the noise variance is what the covariance of the image's patches holds in its weakest
# directions, among the patches whose texture (the sum of their squared differences between
# neighbouring pixels) the noise alone would explain with probability TEXTURE_QUANTILE, the
# weakest directions chosen as Chen, Zhu & Heng (2015) do (the smallest eigenvalues whose mean is
# their median). Colour images are first turned into orthonormal opponent channels (white noise
# stays white, of the same std), whose patches are pooled: the two colour-difference channels of
# photographs are smooth, and their patches are mostly noise. Measured (docs/design.md): on 64
# crops of 64x64 of the four held-out photographs, estimate / true sigma, median [least, 90th
# percentile]: 1.01 [0.89, 1.16] at 5% noise, 1.14 [0.95, 2.10] at 2%, 1.36 [0.94, 3.64] at 1%,
# where the photographs' own grain and texture are as strong as the noise; on the whole
# photographs 1.00-1.15 at 2%. Patches of 6x6 gave the least spread of 5x5 to 8x8; noise alone
# of 64x64 reads 0.98 times its std (the quantile's cut and the patches' finite number).
NOISE_PATCH = 6
TEXTURE_QUANTILE = 0.99
TEXTURE_ITERATIONS = 10
# at least this many patches (of one sample) times their dimension: fewer leave the covariance's
# weakest directions ill-determined (noise alone of 32x32, 729 patches less those of its least
# and greatest pixels, read 0.96 times its std)
PATCHES_PER_DIMENSION = 16
# and at least this many times their dimension of weak texture for a new estimate
WEAK_PER_DIMENSION = 4
# patch positions on a grid coarse enough to keep about this many per channel
MAX_PATCHES = 2**17
# an orthonormal colour transform: brightness and two colour differences
OPPONENT = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
OPPONENT /= OPPONENT.norm(dim=1, keepdim=True)


def _texture(patches: torch.Tensor) -> torch.Tensor:
    """Each patch's texture, ``(L, p, p) -> (L,)``: its squared differences between horizontal
    and vertical neighbours, summed."""
    across = patches[:, :, 1:] - patches[:, :, :-1]
    down = patches[:, 1:, :] - patches[:, :-1, :]
    return across.square().sum((1, 2)) + down.square().sum((1, 2))


@functools.cache
def _texture_threshold() -> float:
    """The ``TEXTURE_QUANTILE`` quantile of the texture of patches of white noise of std 1, by
    Monte Carlo from a fixed seed (the same in every run; computed once per process)."""
    noise = torch.randn(2**16, NOISE_PATCH, NOISE_PATCH, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    return float(torch.quantile(_texture(noise), TEXTURE_QUANTILE))


def _weakest_variance(patches: torch.Tensor) -> float:
    """The mean of the smallest eigenvalues of the patches' covariance whose mean is their
    median (Chen, Zhu & Heng 2015): the noise variance where the patches are noise in those
    directions. ``patches``: ``(L, d)``."""
    centred = patches - patches.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / len(patches))
    for k in range(len(eigenvalues), 0, -1):
        tail = eigenvalues[:k]
        mean = tail.mean()
        if int((tail > mean).sum()) == int((tail < mean).sum()):
            return max(float(mean), 0.0)
    return max(float(eigenvalues[0]), 0.0)


def _observed_pixels(op: LinearOperator) -> torch.Tensor:
    """Which pixels of a picture's measurements are data, ``(H, W)`` booleans: inpainting's
    observed ones (its unobserved pixels are stored as 0), all for denoise and blur."""
    if isinstance(op, Inpainting):
        return op.mask.cpu() == 1
    return torch.ones(op.measurement_shape[-2:], dtype=torch.bool)


def _at_extremes(values: torch.Tensor) -> torch.Tensor:
    """Which values of ``(N, C, ...)`` sit at their channel's least or greatest value in their
    sample (where a camera clipped them), the same shape."""
    flat = values.flatten(2)
    extreme = (flat == flat.amax(2, keepdim=True)) | (flat == flat.amin(2, keepdim=True))
    return extreme.view_as(values)


def _patch_noise_std(op: LinearOperator, b: np.ndarray) -> NoiseEstimate:
    """Each sample's noise std from the statistics of its image's patches (the constants above):
    an estimate from all patches, then from those of weak texture at that level, repeated until
    they are the same patches. Inpainting's patches are those of observed pixels only. Patches
    that hold a pixel at its channel's least or greatest value in the sample are left out: where
    a camera clipped the image (a white sky, black shadows), the noise is clipped too, and such
    patches would pass for the least noisy (camera.png brightened until 17% of its pixels were
    white read 0.78 times the noise at 2% with them); elsewhere that is one pixel each. Samples
    left with too few patches are refused, all of them named at once (no other sample's level
    can stand in for theirs: under the contract's noise percent a dark crop's noise is far
    weaker than a bright one's, and a camera's is not)."""
    size, channels = NOISE_PATCH, op.channels
    height, width = op.image_shape[1:]
    positions = max(0, height - size + 1) * max(0, width - size + 1)
    stride = max(1, math.ceil(math.sqrt(positions / MAX_PATCHES)))
    dimension = size * size
    needed, least = PATCHES_PER_DIMENSION * dimension, WEAK_PER_DIMENSION * dimension
    where = "of observed pixels " if isinstance(op, Inpainting) else ""
    refusal = (f"the noise estimate of {op.kind} reads the image's statistics, from its "
               f"{size}x{size} patches {where}(at least {needed} are needed), and ")
    observed = _observed_pixels(op)
    count = positions and channels * int(
        (F.unfold(observed[None, None].double(), size, stride=stride).amin(1) == 1).sum())
    if count < needed:
        raise DripError(f"{refusal}these measurements hold {count}: give --noise-std or "
                        "--noise-percent")
    values = torch.from_numpy(b.astype(np.float64))
    extreme = _at_extremes(values).any(1, keepdim=True)
    usable = (observed & ~extreme).to(torch.float64)   # (N, 1, H, W)
    whole = F.unfold(usable, size, stride=stride).amin(1) == 1   # (N, L): every pixel usable
    threshold = _texture_threshold()
    std, fewest = np.full(len(b), np.nan, np.float32), None
    for i, sample in enumerate(values):
        if channels * int(whole[i].sum()) < needed:
            continue
        if channels == 3:
            sample = torch.einsum("kc,chw->khw", OPPONENT, sample)
        patches = F.unfold(sample[:, None], size, stride=stride).transpose(1, 2)[:, whole[i]]
        patches = patches.reshape(-1, dimension)   # every channel's, (C L, p^2)
        texture = _texture(patches.view(-1, size, size))
        variance, chosen = _weakest_variance(patches), None
        for _ in range(TEXTURE_ITERATIONS):
            weak = texture < variance * threshold
            # too few: the level so far stands (from more patches, so if anything high); the
            # least textured patches instead would be those of the least noise, and the
            # estimate from them low
            if int(weak.sum()) < least or (chosen is not None and torch.equal(weak, chosen)):
                break
            chosen, variance = weak, _weakest_variance(patches[weak])
        std[i] = math.sqrt(variance)
        used = len(patches) if chosen is None else int(chosen.sum())
        fewest = used if fewest is None else min(fewest, used)
    short = np.flatnonzero(np.isnan(std))
    if len(short):
        i = short[0]
        raise DripError(
            f"{refusal}{len(short)} of the {len(b)} samples "
            f"{'holds' if len(short) == 1 else 'hold'} fewer, leaving out the patches "
            f"of their pixels at their channel's least or greatest value, where the image may be "
            f"clipped (sample {i}: {channels * int(whole[i].sum())} patches, "
            f"{int((extreme[i] & observed).sum())} such pixels; samples "
            f"{', '.join(map(str, short[:8]))}{', ...' if len(short) > 8 else ''}): give "
            "--noise-std or --noise-percent")
    return NoiseEstimate(std, patches=fewest)


def estimate_noise_std(op: LinearOperator, b: np.ndarray) -> NoiseEstimate:
    """Each sample's noise std, from the measurement components that the operator all but
    removes: those along the left singular vectors of ``A`` whose singular value is below
    ``ESTIMATE_GAIN`` of the largest, the left null space included. White noise of std
    ``sigma`` has ``E c^2 = sigma^2`` in each such (orthonormal) component ``c``, while the
    image reaches them only weakly; what is left of it there raises the estimate a little at
    very low noise (see ``ESTIMATE_GAIN``).

    For a blur these are Fourier coefficients at the frequencies where its gain is weak. With
    the valid boundary the measurements are not periodic, and their edges would spread the
    image's power over every frequency: each sample is first centred and tapered by a Hann
    window ``w``, which divides the noise's power by ``mean(w^2)``, and the gain is the PSF's
    on the measurements' own grid. For a sparse matrix (tomography, a user's matrix) they
    come from its Gram matrix (:func:`_sparse_noise_std`).

    Denoise and inpainting remove nothing: their estimate reads the image's statistics instead
    (:func:`_patch_noise_std`), which takes texture finer than the noise for noise."""
    if isinstance(op, Blur):
        return _blur_noise_std(op.psf, b, op.channels, tapered=not op.periodic)
    if isinstance(op, SparseMatrixOperator):
        return _sparse_noise_std(op, b)
    if isinstance(op, (Denoise, Inpainting)):
        return _patch_noise_std(op, b)
    raise DripError(f"--estimate-noise does not know the {op.kind} operator: give --noise-std "
                    "or --noise-percent")


# Measurements of a periodic blur whose untapered noise estimate is this many times the tapered
# one (the median over the samples) are doubted: on simulated periodic blurs (the second
# held-out set's 64 crops, sigma 2, one noise draw at each of 1-10%) the ratio was 0.97-1.07;
# on 16 photograph crops of 128x128 blurred whole and cut out 1.06-7.0 (median 2.1) at 2%
# noise, on 4 others at 1% 2.1-9.4.
EDGE_DOUBT = 1.25


def periodic_doubt(op: LinearOperator, b: np.ndarray,
                   untapered: np.ndarray | None = None) -> str | None:
    """For a periodic blur, a warning where the measurements look cut out of a larger scene (a
    camera's), whose edges do not wrap around: their power at the frequencies the blur removes
    is then far above the same power measured with the edges tapered away. ``untapered``: the
    estimate without the taper, where :func:`estimate_noise_std` made it already."""
    if not (isinstance(op, Blur) and op.periodic):
        return None
    try:
        if untapered is None:
            untapered = _blur_noise_std(op.psf, b, op.channels, tapered=False).std
        ratio = untapered / _blur_noise_std(op.psf, b, op.channels, tapered=True).std
    except DripError:   # too few weak frequencies to tell
        return None
    if not np.median(ratio) > EDGE_DOUBT:
        return None
    return (f"the measurements' edges do not wrap around as the periodic blur's do (at the "
            f"frequencies it removes, their power is {np.median(ratio):.1f} times that with the "
            "edges tapered, the median of the samples): if a camera took them, give "
            "--blur-boundary valid")


# A sinogram's detectors that no ray through the image reaches measure noise alone, which is
# uncorrelated between neighbouring detectors. Where the median over the samples of that
# correlation exceeds FIELD_DOUBT, they are taken to see more: an object that extends beyond the
# image, or an offset. Measured (64x64 images, 32 angles over 120 degrees, 269 neighbouring
# pairs; 16 photograph crops, 0.03-10% noise): -0.13 to 0.16 with the object inside the image,
# 0.985-0.999 with 96x96 crops measured by the same detectors (the noise estimate then 33-77
# times the truth), and 0.04-0.44 (median) with an offset of 1% of mean |b| at 1-5% noise.
FIELD_DOUBT = 0.5


def field_of_view_doubt(op: LinearOperator, b: np.ndarray) -> str | None:
    """For tomography, a warning where the detectors that no ray through the image reaches (the
    Radon matrix's zero rows) see more than noise: their neighbours' values agree (their
    correlation, median over the samples, above ``FIELD_DOUBT``)."""
    if not isinstance(op, Tomography):
        return None
    outside = op.zero_rows().reshape(op.measurement_size)
    pairs = outside[:, :-1] & outside[:, 1:]   # neighbouring detectors, both outside
    if pairs.sum() < 16:   # too few to tell
        return None
    values = b.astype(np.float64)
    left, right = values[..., :-1][..., pairs], values[..., 1:][..., pairs]
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = ((left * right).sum(axis=(1, 2))
                       / np.sqrt(np.square(left).sum(axis=(1, 2))
                                 * np.square(right).sum(axis=(1, 2))))
    median = float(np.median(np.nan_to_num(correlation)))
    if not median > FIELD_DOUBT:
        return None
    height, width = op.image_shape[1:]
    return (f"the detectors that no ray through the {height}x{width} image reaches measure more "
            f"than noise (neighbouring ones agree: correlation {median:.2f}, the median of the "
            f"samples, where noise gives about 0): the object extends beyond the image, or the "
            f"data carry an offset, and no {height}x{width} image can fit them (--image-size "
            f"{op.n_detectors} reconstructs the square the detector spans)")


# Measured pictures (denoise, blur, inpainting) of which more than this share of values sit at
# their channel's least or greatest value in the sample are taken to be clipped: a photograph
# brightened until 18-24% of its blurred pixels were white read 0.89-0.91 times its noise
# through the blur estimate, 0.57-0.81 through the patch estimate before it left such pixels
# out; unclipped, one value each.
CLIPPED_DOUBT = 0.02


def clipping_doubt(op: LinearOperator, b: np.ndarray) -> str | None:
    """For measurements that are pictures, a warning where many values sit at their channel's
    least or greatest value in their sample, as where a camera clipped them: the noise is
    clipped there too, which ``b = A x + noise`` does not describe."""
    if op.kind not in IMAGE_MEASUREMENT_KINDS:
        return None
    extreme = _at_extremes(torch.from_numpy(b)) & _observed_pixels(op)
    share = float(extreme.sum()) / (op.measured_count * len(b))
    if not share > CLIPPED_DOUBT:
        return None
    return (f"{100 * share:.1f}% of the measurements sit at their channel's least or greatest "
            "value in their sample, as where a camera clipped them: b = A x + noise does not "
            "hold there (the clipped noise is weaker, so an estimate of it reads low, and those "
            "pixels' fit means less)")


def _mean_magnitude(op: LinearOperator, b: np.ndarray) -> np.ndarray:
    """Each sample's mean ``|b|`` over its measured entries, in float64."""
    return np.abs(b.astype(np.float64)).reshape(len(b), -1).sum(1) / op.measured_count


def noise_levels(op: LinearOperator, b: np.ndarray, choice: NoiseChoice,
                 mean_magnitude: np.ndarray) -> tuple[np.ndarray, NoiseEstimate | None]:
    """Each sample's noise std as ``choice`` says (``mean_magnitude``: each sample's mean
    ``|b|``, :func:`_mean_magnitude`), and the estimate where it was estimated."""
    estimate = None
    if choice.estimate:
        estimate = estimate_noise_std(op, b)
        sigma = estimate.std
    elif choice.noise_std is not None:
        sigma = np.full(len(b), choice.noise_std)
    else:
        sigma = choice.noise_percent / 100 * mean_magnitude
    silent = np.flatnonzero(~(sigma > 0))
    if len(silent):
        why = ("nothing in its measurements varies as noise does" if choice.estimate
               else "its measurements are all zero")
        raise DripError(f"the noise level of sample {silent[0]} would be 0 ({why}): leave such "
                        "samples out, or give --noise-std")
    require_resolvable_noise(sigma, "the noise std", "rescale the measurements")
    require_representable_radius(sigma, op.measured_count, "the noise std", "lower --noise-std "
                                 "or --noise-percent (is it in the measurements' units?)")
    return sigma.astype(np.float32), estimate


def read_ground_truth(path: Path, op: LinearOperator, n: int,
                      channels: int | None = None, slices: slice | None = None) -> np.ndarray:
    """The true images of ``n`` samples (pictures or a ``.npy`` array, read as measurements
    are; only ``slices`` of them where given), checked against the operator's image shape."""
    truth = read_measured(path, 2, channels, what="ground truth images",
                          subset=None if slices is None else (0, slices))
    if truth.shape != (n, *op.image_shape):
        raise DripError(f"the ground truth is shaped {truth.shape} (N, C, H, W), where the "
                        f"{n} samples' images are {op.image_shape}", path)
    return truth


def sinograms_of_projections(b: np.ndarray, source) -> np.ndarray:
    """A scanner's projections read as ``(A, 1, S, D)`` (one ``S x D`` projection per angle:
    the first axis of an array ``(angles, slices, detectors)``, as Data Exchange stores
    ``exchange/data``, or a picture or TIFF page per angle) as the sinograms of its ``S``
    slices, ``(S, 1, A, D)``."""
    if b.shape[1] != 1:
        raise DripError(f"read as projections (angles, slices, detectors), it has "
                        f"{b.shape[1]} channels: projections have one", source)
    return np.ascontiguousarray(b[:, 0].transpose(1, 0, 2)[:, None])


def _field(path: Path, what: str, shape: tuple[int, int], slices: slice | None) -> np.ndarray:
    """A flat or dark field, ``(slices, detectors)`` or a stack of them, averaged: the counts
    as they are (only ``slices`` of them where given), in float64, checked against the
    projections' ``shape``."""
    values = read_measured(path, 2, what=what, counts=True,    # (k, C, slices, detectors)
                           subset=None if slices is None else (-2, slices))
    if values.shape[1] != 1 or values.shape[2:] != shape:
        raise DripError(f"the {what} is shaped {values.shape[2:]} with {values.shape[1]} "
                        f"channel(s) (a stack of (slices, detectors) images, averaged), where "
                        f"the projections have {shape[0]} slices of {shape[1]} detectors", path)
    return values[:, 0].astype(np.float64).mean(axis=0)


def line_integrals(counts: np.ndarray, flat: Path, dark: Path | None,
                   slices: slice | None = None) -> tuple[np.ndarray, dict]:
    """The line integrals ``-log((I - dark) / (flat - dark))`` of a detector's counts ``I``,
    ``(slices, 1, angles, detectors)`` (the sinograms of a scan's slices), with the flat field
    (the open beam) and the dark field (no beam; 0 without one), each ``(slices, detectors)``
    or a stack of them (only ``slices`` of them, as of the counts, where given); and the
    record of it. Counts at or below the dark field (no light measured) take the least
    transmission measured, with a warning."""
    shape = (counts.shape[0], counts.shape[-1])
    flat_counts = _field(flat, "flat field", shape, slices)
    dark_counts = np.zeros(shape) if dark is None else _field(dark, "dark field", shape, slices)
    light = flat_counts - dark_counts
    dead = ~(light > 0)
    if dead.any():
        slice_, detector = np.argwhere(dead)[0]
        slice_ += 0 if slices is None else slices.start   # the scan's own count
        raise DripError(f"the flat field is not brighter than the dark field at {dead.sum()} "
                        f"of its {dead.size} detectors (the first: slice {slice_}, detector "
                        f"{detector}): their counts cannot be turned into line integrals; "
                        "leave those detectors out", flat)
    ratio = (counts.astype(np.float64) - dark_counts[:, None, None]) / light[:, None, None]
    dim = ~(ratio > 0)
    if dim.all():
        raise DripError("every count is at or below the dark field: no light was measured")
    if dim.any():
        least = float(ratio[~dim].min())
        ratio[dim] = least
        warnings.warn(DripWarning(
            f"{dim.sum()} of the {dim.size} counts are at or below the dark field (no light "
            f"measured): taken as the least transmission measured, {least:.3g} (line "
            f"integral {-math.log(least):.3g})"), stacklevel=2)
    median = float(np.median(ratio))
    if median > 1.1:
        warnings.warn(DripWarning(
            f"the projections are brighter than the flat field (median transmission "
            f"{median:.3g}, where an object only absorbs): are they counts, and is the flat "
            "field the open beam's?"), stacklevel=2)
    record = {"line_integrals_from": "-log((counts - dark) / (flat - dark))",
              "flat_field": str(flat), "dark_field": "none (0)" if dark is None else str(dark)}
    return (-np.log(ratio)).astype(np.float32), record


def import_measurements(source: Path, out: Path, spec: OperatorSpec | None, like: Path | None,
                        choice: NoiseChoice, channels: int | None = None,
                        attrs: dict | None = None, ground_truth: Path | None = None,
                        projections: bool = False, flat: Path | None = None,
                        dark: Path | None = None, slices: slice | None = None) -> dict:
    """Write ``out``, the measurement file of the measurements at ``source`` (and the true
    images at ``ground_truth``, where given); return a summary. ``projections``: tomography
    measurements given as a scanner's projections, one per angle
    (:func:`sinograms_of_projections`), not as sinograms; ``flat`` (and ``dark``): they are
    a detector's counts, turned into line integrals (:func:`line_integrals`); ``slices``:
    only those of a stack (the samples, or the projections' slices), read alone."""
    choice.check()
    like_op = None
    if like is not None:
        with MeasurementFile(like, noise_levels="ignored") as file:
            like_op = file.operator
    kind = spec.kind if like_op is None else like_op.kind
    rank = 1 if kind == "matrix" else 2
    if (projections or flat is not None or slices is not None) and kind != "tomography":
        raise DripError(f"--projections, --flat, --dark and --slices read a scanner's "
                        f"projections for tomography; the {kind} operator's measurements are "
                        "read as they are")
    if dark is not None and flat is None:
        raise DripError("--dark needs --flat: the line integrals are -log((counts - dark) / "
                        "(flat - dark))")
    b = read_measured(source, rank, channels, images=kind in IMAGE_MEASUREMENT_KINDS,
                      counts=flat is not None,
                      subset=None if slices is None else (-2 if projections else 0, slices))
    if projections:
        b = sinograms_of_projections(b, source)
    counted = {}
    if flat is not None:
        b, counted = line_integrals(b, flat, dark, slices)
    if like_op is not None and like_op.channels != b.shape[1]:
        raise DripError(f"its operator is for images of {like_op.channels} channel(s), the "
                        f"measurements have {b.shape[1]}", like)
    axis = None
    if spec is not None and spec.kind == "tomography":
        if spec.angles is None and spec.angle_file is None:   # one per row of the sinogram
            spec = dataclasses.replace(spec, angles=b.shape[-2])
        if spec.angle_file is not None:   # read once, for the axis and the operator (and warned
            spec = dataclasses.replace(   # of once, where they look like radians)
                spec, angle_values=tuple(tomography_angles(spec).tolist()))
        if spec.center_offset is None:   # --center-offset auto
            axis = _estimated_axis(spec, b, source)
            spec = dataclasses.replace(spec, center_offset=0.0 if axis is None else axis.offset)
    op = measured_operator(spec, like_op, b.shape[1:])
    b = op.project_measurements(torch.from_numpy(b)).numpy()   # inpainting: unobserved are 0
    outside = field_of_view_doubt(op, b)
    if outside is not None:
        if choice.estimate:   # the estimate would read the object there (33-77 times the truth)
            raise DripError(f"{outside}; and the noise estimate, which reads those detectors "
                            "as noise, would take the object for it", source)
        warnings.warn(DripWarning(outside), stacklevel=2)
    mean_magnitude = _mean_magnitude(op, b)
    sigma, estimate = noise_levels(op, b, choice, mean_magnitude)
    unconstrained = int(zero_fits(op, torch.from_numpy(b), discrepancy_radius(
        op, torch.from_numpy(sigma).double(), 1.0)).sum())
    if unconstrained:   # at the contract's tau = 1
        warnings.warn(DripWarning(zero_fits_warning(unconstrained, len(b), 1.0)), stacklevel=2)
    # a periodic blur's estimate is the untapered one
    for doubt in (periodic_doubt(op, b, None if estimate is None else estimate.std),
                  clipping_doubt(op, b), None if axis is not None else axis_doubt(op, b)):
        if doubt is not None:
            warnings.warn(DripWarning(doubt), stacklevel=2)
    truth = (None if ground_truth is None else
             read_ground_truth(ground_truth, op, len(b), channels, slices))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        percent = 100 * sigma / mean_magnitude
    # a record only (the noise std is what counts): NaN where float32 cannot hold it
    percent = np.where(np.abs(percent) < np.finfo(np.float32).max, percent, np.nan)
    percent = percent.astype(np.float32)
    with atomic_h5(out) as handle:
        writer = MeasurementWriter(handle, op, len(b), with_ground_truth=truth is not None,
                                   attrs={**(attrs or {}), "source": str(source),
                                          **({"source_layout": "projections (angles, slices, "
                                                               "detectors)"}
                                             if projections else {}), **counted,
                                          **({} if slices is None else
                                             {"source_slices": f"{slices.start}:{slices.stop}"}),
                                          "noise_std_from": choice.how,
                                          **({} if estimate is None else estimate.attrs()),
                                          **({} if axis is None else axis.attrs())})
        writer.write(0, measurements=b, noise_std=sigma, noise_percent=percent,
                     **({} if truth is None else {"ground_truth": truth}))
    return {"samples": len(b), "operator": op, "noise_std": sigma, "noise_percent": percent,
            "estimate": estimate, "axis": axis}
