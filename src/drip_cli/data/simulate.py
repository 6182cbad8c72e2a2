"""Simulated measurements ``b = A x + sigma e`` under the contract's noise convention.

Noise percent ``p`` means, per sample, ``sigma = p / 100 * mean(|A x|)``, the mean taken over the
``M`` measured entries (for inpainting: the observed pixels). ``e`` is standard Gaussian; entries
that are not data (unobserved pixels) stay 0.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DripError, DripWarning, require_regular_file
from ..io.datasets import is_dataset_source, read_dataset, subset_index
from ..io.measurements import (overflows_float32, require_representable_radius,
                               require_resolvable_noise)
from ..operators import (Blur, Denoise, Inpainting, LinearOperator, SparseMatrixOperator,
                         Tomography, gaussian_psf, gaussian_psf_size, limited_angles,
                         load_matrix_file)
from .sources import IMAGE_SUFFIXES, read_picture


def parse_noise_percent(text: str) -> tuple[float, float]:
    """``"2"`` -> (2, 2); ``"1:5"`` -> (1, 5). Raises ``ValueError`` on anything else."""
    parts = str(text).split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"expected P or A:B, got {text!r}")
    try:
        low, high = (float(parts[0]), float(parts[-1]))
    except ValueError as exc:
        raise ValueError(f"expected numbers as P or A:B, got {text!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high < low:
        raise ValueError(f"noise percent must be positive (and A <= B), got {text!r}")
    return low, high


def format_noise_percent(low: float, high: float, digits: int = 3) -> str:
    """The inverse of :func:`parse_noise_percent`, to ``digits`` significant digits: ``"2"`` or
    ``"1:5"`` (a range whose ends agree to those digits, as noise levels estimated from a file's
    own ``noise_std`` do, is one value)."""
    low_text, high_text = f"{low:.{digits}g}", f"{high:.{digits}g}"
    return low_text if low_text == high_text else f"{low_text}:{high_text}"


def draw_noise_percent(n: int, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    return np.full(n, low) if low == high else rng.uniform(low, high, size=n)


def noise_std_for(op: LinearOperator, clean: torch.Tensor, percent: torch.Tensor) -> torch.Tensor:
    """``sigma_i = p_i / 100 * mean(|A x_i|)`` from the clean measurements ``A x``."""
    mean_abs = clean.abs().flatten(1).sum(1) / op.measured_count
    return percent.to(clean) / 100.0 * mean_abs


def require_measurable(noise_std, path, offset: int = 0, op: LinearOperator | None = None) -> None:
    """Refuse ground truth whose clean measurements are all zero (a black image, or one the
    operator does not see): a noise level of p% of ``mean(|A x|)`` is then 0, which no
    measurement file can hold. ``offset``: the index of ``noise_std[0]`` in the file; ``op``,
    where given, is named when it measures under 1% of the pixels (an inpainting mask of a
    tiny ``--keep-fraction``), the likelier cause then."""
    silent = offset + np.flatnonzero(np.asarray(noise_std) <= 0)
    if len(silent):
        which = ", ".join(str(i) for i in silent[:5]) + (" ..." if len(silent) > 5 else "")
        images = "image" if len(silent) == 1 else "images"
        cause = "leave such images out"
        if op is not None and 100 * op.measured_count < math.prod(op.image_shape):
            cause = (f"the operator measures only {op.measured_count} of the "
                     f"{math.prod(op.image_shape)} pixel values"
                     + (" (raise --keep-fraction)" if op.kind == "inpainting" else ""))
        raise DripError(f"ground-truth {images} {which} give{'s' * (len(silent) == 1)} all-zero "
                        "measurements A x, so the noise level (a percent of mean |A x|) would be "
                        f"0: {cause}", path)


def add_noise(op: LinearOperator, clean: torch.Tensor, noise_std: torch.Tensor,
              standard_normal: torch.Tensor) -> torch.Tensor:
    """``b = A x + sigma e`` with non-data entries kept at 0. ``e`` may come from another device
    (drawn by a CPU generator, a seed gives the same noise on every device)."""
    shape = (-1,) + (1,) * (clean.ndim - 1)
    return op.project_measurements(clean + noise_std.view(shape) * standard_normal.to(clean))


@dataclass
class OperatorSpec:
    """How to build an operator from command-line options."""

    kind: str
    blur_sigma: float = 2.0
    blur_size: int | None = None
    psf_file: Path | None = None
    blur_boundary: str = "periodic"
    keep_fraction: float = 0.5
    mask_file: Path | None = None
    angles: int = 32
    angle_range: float = 180.0
    angle_start: float = 0.0
    angle_file: Path | None = None   # tomography: the angles themselves, in place of the three
    angle_values: tuple[float, ...] | None = None   # tomography: angle_file's, once read
    detectors: int | None = None     # tomography: a centred window of the detector line
    center_offset: float | None = 0.0   # tomography: the rotation axis's detector, from the
    #                                     centre; None (import): estimated from the sinograms
    image_side: int | None = None    # tomography (import): the square image's side
    matrix_file: Path | None = None


def read_npy(path, what: str, mmap: bool = False, booleans: bool = False) -> np.ndarray:
    """The array of real numbers (or, with ``booleans``, of booleans too) in a ``numpy.save``
    file, read without pickle (``mmap``: memory-mapped, read only); :class:`DripError` naming
    the file and ``what`` it should hold for anything else."""
    require_regular_file(path, f"a .npy file ({what})")
    try:
        # memory-mapped first, also where it is copied below: mapping checks the file's length
        # against the shape its header claims, where reading allocated that much first (a cut
        # file claiming 200000x200000 gave "out of memory ... a smaller --batch-size")
        values = np.load(path, allow_pickle=False, mmap_mode="r")
    except OSError as exc:
        raise DripError(f"cannot read {what} ({exc.strerror or exc})", path) from exc
    except (EOFError, ValueError) as exc:
        # an empty file is an EOFError (NumPy 1.24: a ValueError); a text file reads as
        # "pickled data", a cut one won't reshape
        reason = ("the file is empty" if os.path.getsize(path) == 0 else
                  "it holds Python objects, which drip does not unpickle (save an array of "
                  "numbers)" if "Python objects" in str(exc) else
                  "not a .npy array, or a truncated one (save it with numpy.save)")
        raise DripError(f"cannot read {what}: {reason}", path) from exc
    if not isinstance(values, np.ndarray):   # an .npz archive
        values.close()
        raise DripError(f"cannot read {what}: expected one array saved with numpy.save, not an "
                        ".npz archive", path)
    if values.dtype.kind not in "fiu" + "b" * booleans:
        raise DripError(f"cannot read {what}: expected real numbers"
                        f"{' or booleans' * booleans}, got dtype {values.dtype}", path)
    return values if mmap else np.array(values)


def read_array(source, what: str, booleans: bool = False,
               subset: tuple[int, slice] | None = None) -> np.ndarray:
    """A ``.npy`` array or an HDF5 dataset (``FILE.h5::DATASET``, or an HDF5 file of one
    dataset), as stored (:func:`read_npy`, :func:`~drip_cli.io.datasets.read_dataset`); of a
    stack, only the slices ``subset`` keeps, read alone (:func:`~drip_cli.io.datasets.
    subset_index`)."""
    if is_dataset_source(source):
        return read_dataset(source, what, booleans, subset)
    if subset is None:
        return read_npy(source, what, booleans=booleans)
    values = read_npy(source, what, mmap=True, booleans=booleans)
    return np.array(values[subset_index(values.shape, subset, source)])


def _text_numbers(path, what: str) -> np.ndarray:
    """The numbers of a text file, separated by white space or commas (``#`` starts a
    comment)."""
    if not os.path.exists(path):
        raise DripError("no such file", path)
    require_regular_file(path, f"a text file ({what})")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DripError(f"cannot read {what} as text (a .npy array, an HDF5 dataset or a text "
                        f"file of numbers): {getattr(exc, 'strerror', None) or exc}", path) from exc
    tokens = " ".join(line.split("#")[0] for line in text.splitlines()).replace(",", " ").split()
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            raise DripError(f"cannot read {what}: {token[:20]!r} is not a number", path) from None
    return np.array(values)


def read_angles(path) -> np.ndarray:
    """Projection angles in degrees, one per row of a sinogram, from a ``.npy`` array, an HDF5
    dataset (``FILE.h5::DATASET``) or a text file of numbers; a warning where they look like
    radians."""
    what = "the angles"
    values = (read_array(path, what)
              if is_dataset_source(path) or str(path).lower().endswith(".npy")
              else _text_numbers(path, what))
    values = np.asarray(values, dtype=np.float64)
    if values.ndim > 1 and sorted(values.shape)[:-1] == [1] * (values.ndim - 1):
        values = values.ravel()   # a row or a column
    if values.ndim != 1 or len(values) == 0:
        raise DripError(f"{what} must be a list of numbers (degrees), got shape {values.shape}",
                        path)
    if not np.all(np.isfinite(values)):
        raise DripError(f"{what} contain NaN or Inf", path)
    span = float(values.max() - values.min())
    if len(values) >= 4 and 0 < span <= 2 * math.pi * (1 + 1e-6):
        warnings.warn(DripWarning(f"{path}: the {len(values)} angles span only {span:.4g} "
                                  "degrees; drip reads degrees: if these are radians, convert "
                                  "them (numpy.degrees)"), stacklevel=2)
    return values


def read_mask(path, image_size: tuple[int, int]) -> np.ndarray:
    """An inpainting mask (non-zero = observed) from a picture, a ``.npy`` array or an HDF5
    dataset of the images' ``(H, W)``, as uint8."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES and not is_dataset_source(path):
        mask = read_picture(Path(path))
        mask = mask.any(axis=-1) if mask.ndim == 3 else mask
    else:
        mask = read_array(path, "mask", booleans=True)
    if mask.shape != tuple(image_size):
        raise DripError(f"the mask is shaped {mask.shape}, where the images are "
                        f"{image_size[0]}x{image_size[1]}", path)
    return (np.asarray(mask) != 0).astype(np.uint8)


def matrix_operator(path: Path | None, image_shape: tuple[int, ...]) -> SparseMatrixOperator:
    """The ``--matrix`` operator for images of ``image_shape``, or ``(C,)`` alone for square
    images of as many pixels as the matrix has columns."""
    if path is None:
        raise DripError("the matrix operator needs --matrix FILE.npz (scipy.sparse.save_npz)")
    try:
        data, indices, indptr, shape = load_matrix_file(path)
    except (OSError, KeyError, ValueError) as exc:
        raise DripError(f"invalid sparse matrix ({exc})", path) from exc
    if len(image_shape) == 1:
        side = math.isqrt(shape[1])
        if side * side != shape[1]:
            raise DripError(f"the matrix's {shape[1]} columns are not the pixels of a square "
                            "image: give the operator with --like FILE.h5, a measurement file "
                            "of the image shape", path)
        image_shape = (image_shape[0], side, side)
    try:
        return SparseMatrixOperator.from_csr(image_shape, data, indices, indptr, shape)
    except (OSError, KeyError, ValueError) as exc:
        raise DripError(f"invalid sparse matrix ({exc})", path) from exc


def tomography_angles(spec: OperatorSpec) -> np.ndarray:
    """The angles (degrees) of a tomography ``spec``: its ``angle_file``'s, or ``angles`` spaced
    evenly over ``angle_range`` from ``angle_start``."""
    if spec.angle_values is not None:
        return np.array(spec.angle_values)
    if spec.angle_file is not None:
        return read_angles(spec.angle_file)
    return limited_angles(spec.angles, spec.angle_range, spec.angle_start)


def build_operator(spec: OperatorSpec, image_shape: tuple[int, int, int],
                   rng: np.random.Generator) -> LinearOperator:
    """The operator a user asked for; option errors raise :class:`DripError`."""
    try:
        if spec.kind == "denoise":
            return Denoise(image_shape)
        if spec.kind == "blur":
            if spec.psf_file is not None:
                psf = read_array(spec.psf_file, "PSF")
                try:
                    return Blur(image_shape, psf, spec.blur_boundary)
                except ValueError as exc:
                    raise DripError(f"invalid PSF: {exc}", spec.psf_file) from exc
            # a PSF many times the image's size wraps around into a near-constant kernel, and a
            # huge one (--blur-sigma 1e6) would not fit in memory: refuse it by name
            size = spec.blur_size if spec.blur_size is not None else gaussian_psf_size(spec.blur_sigma)
            limit = 4 * max(image_shape[1:]) + 1
            if size > limit:
                raise DripError(f"the PSF would be {size}x{size} pixels, more than four times the "
                                f"{image_shape[1]}x{image_shape[2]} images (at most {limit}): "
                                "choose a smaller --blur-sigma or --blur-size")
            return Blur(image_shape, gaussian_psf(spec.blur_sigma, spec.blur_size),
                        spec.blur_boundary)
        if spec.kind == "inpainting":
            if spec.mask_file is None:
                return Inpainting.random(image_shape, spec.keep_fraction, rng)
            try:
                return Inpainting(image_shape, read_mask(spec.mask_file, image_shape[1:]))
            except ValueError as exc:
                raise DripError(f"invalid mask: {exc}", spec.mask_file) from exc
        if spec.kind == "tomography":
            return Tomography(image_shape, tomography_angles(spec), spec.detectors,
                              spec.center_offset)
        if spec.kind == "matrix":
            return matrix_operator(spec.matrix_file, image_shape)
    except ValueError as exc:
        raise DripError(f"invalid {spec.kind} operator options: {exc}") from exc
    raise DripError(f"unknown operator kind {spec.kind!r} "
                    "(denoise, blur, inpainting, tomography, matrix)")


@torch.no_grad()
def simulate_batch(op: LinearOperator, images: np.ndarray, percent: np.ndarray,
                   rng: np.random.Generator, source=None,
                   offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Measurements and noise std (float32) for a batch of images, computed in float64.
    Measurements no drip file may hold (a noise level of 0, or too large for float32) raise
    :class:`DripError` naming ``source``; ``offset``: the index of ``images[0]`` there."""
    x = torch.from_numpy(images.astype(np.float64))
    clean = op(x)
    sigma = noise_std_for(op, clean, torch.from_numpy(percent))
    require_measurable(sigma.numpy(), source, offset, op)
    if overflows_float32(clean.numpy()):
        raise DripError("the images are too large: their measurements overflow float32 "
                        "arithmetic (scale them to [0, 1])", source)
    require_resolvable_noise(sigma.numpy(), "the noise std", "scale the images to [0, 1], or "
                             "raise --noise-percent", source, offset)
    require_representable_radius(sigma.numpy(), op.measured_count, "the noise std",
                                 "lower --noise-percent", source, offset)
    e = torch.from_numpy(rng.standard_normal(clean.shape))
    b = add_noise(op, clean, sigma, e).numpy()
    if overflows_float32(b):   # the noise, within float32 alone, added to the measurements
        raise DripError("the measurements with their noise overflow float32 arithmetic "
                        "(lower --noise-percent)", source)
    return b.astype(np.float32), sigma.numpy().astype(np.float32)
