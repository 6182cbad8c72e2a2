"""Measurement files (CONTRACT.md, ``drip_format = "measurements"``): validated on open,
read in batches, written atomically."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..errors import DripError, DripWarning, require_regular_file
from ..operators import LinearOperator, operator_from_hdf5, stored_measurement_shape
from .atomic import atomic_h5

FORMAT_VERSION = 1
SCAN_ROWS = 256  # rows read at a time when checking a dataset for NaN/Inf


@contextlib.contextmanager
def reading(path):
    """Turn low-level read failures (truncated file, corrupt chunk) into a :class:`DripError`."""
    try:
        yield
    except DripError:
        raise
    except (OSError, KeyError, RuntimeError, TypeError) as exc:
        raise DripError(f"cannot read file ({exc})", path) from exc


def open_failure(exc: OSError, path) -> DripError:
    """Why h5py could not open ``path`` for reading, as a :class:`DripError`: the file is
    locked by a process that has it open for writing (HDF5's file locking), or it is damaged."""
    if "unable to lock file" in str(exc):
        return DripError("is open for writing in another process (HDF5 locks it): close it "
                         "there, or wait for that process to finish", path)
    return DripError(f"cannot open HDF5 file, truncated or corrupt ({exc})", path)


def not_hdf5(path: Path, message: str) -> DripError:
    """The error for a file that is not HDF5, naming ``drip import`` where it looks like
    measurements of the user's own (an array or a picture)."""
    from ..data.sources import IMAGE_SUFFIXES   # data imports io: imported at call time

    if path.suffix.lower() in {".npy", *IMAGE_SUFFIXES}:
        message += ": drip import makes a measurement file of an array or of pictures"
    return DripError(message, path)


def open_h5(path: str | os.PathLike, expected_format: str) -> h5py.File:
    """Open an HDF5 file for reading and check its ``drip_format`` / ``format_version``."""
    path = Path(path)
    if not path.exists():
        raise DripError("no such file", path)
    if path.is_dir():
        raise DripError("is a folder, expected an HDF5 file", path)
    require_regular_file(path, "an HDF5 file")
    if not h5py.is_hdf5(path):
        raise not_hdf5(path, "not an HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise open_failure(exc, path) from exc
    try:
        fmt = file_format(handle)
        if fmt != expected_format:
            raise DripError(_format_mismatch(fmt, expected_format), path)
        version = handle.attrs.get("format_version")
        try:
            number = float(np.asarray(version).item())
        except (TypeError, ValueError):   # missing, not a number, or not one value
            number = None
        if number != FORMAT_VERSION:
            shown = "missing" if version is None else repr(np.asarray(version).tolist())
            raise DripError(f"unsupported format_version {shown} (expected {FORMAT_VERSION})", path)
    except BaseException:
        handle.close()
        raise
    return handle


def _format_mismatch(found: str | None, expected: str) -> str:
    """What a file of drip_format ``found`` is, where one of ``expected`` was wanted."""
    wanted = expected.removesuffix("s")
    if found is None:
        hint = (": drip simulate makes one from images (or see the README's 'Your own "
                "measurements')" if expected == "measurements" else "")
        return f"not a drip {wanted} file (it has no drip_format attribute){hint}"
    return f"has drip_format {found!r}, not a drip {wanted} file ({expected!r})"


def file_format(handle: h5py.File) -> str | None:
    fmt = handle.attrs.get("drip_format")
    return fmt.decode() if isinstance(fmt, bytes) else (None if fmt is None else str(fmt))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def samples_overflowing_float32(block: np.ndarray) -> np.ndarray:
    """Per sample of ``block`` (samples along the first axis; a scalar is one sample): whether
    it holds NaN or Inf or has a squared norm beyond float32's range. The solvers work in
    float32, where such a sample would turn into Inf and NaN."""
    rows = len(block) if block.ndim else 1
    squared_norms = np.square(block.astype(np.float64)).reshape(rows, -1).sum(1)
    return ~(squared_norms <= FLOAT32_MAX)   # NaN compares False


# The smallest noise std the float32 solvers resolve: its square, a residual entry's size, stays
# 100 times above float32's smallest normal number (1.2e-38). On the sample tomography file
# scaled down, DRIP's Krylov projections fitted every sample down to noise stds of 9.9e-20 and
# failed inside an SVD on two of 5.2e-20 and 9.9e-21 ("the model's weights are out of range");
# CGLS and TV, which work on the data scaled by a power of two (solvers.cgls), fitted down to
# 2.2e-28 on blur and tomography alike, and so did DRIP on blur, whose projections are exact in
# the Fourier basis.
NOISE_STD_FLOOR = 1e-18


def _refuse_first(values: np.ndarray, where: np.ndarray, what: str, why: str, hint: str,
                  path, offset: int) -> None:
    """Raise :class:`DripError` for the first noise level of ``values`` that ``where`` marks."""
    if where.any():
        first = int(np.flatnonzero(where)[0])
        sample = f" (sample {offset + first})" if values.ndim else ""
        raise DripError(f"{what} {values.reshape(-1)[first]:.3g}{sample} {why} for float32 "
                        f"arithmetic: {hint}", path)


def require_resolvable_noise(noise_std, what: str, hint: str, path=None, offset: int = 0) -> None:
    """Refuse noise levels below :data:`NOISE_STD_FLOOR` (``noise_std``: one per sample, the
    first being sample ``offset``, or one number for all, as ``--noise-std``), naming the first
    as ``what`` and ending with ``hint``."""
    values = np.asarray(noise_std, dtype=np.float64)
    _refuse_first(values, values.reshape(-1) < NOISE_STD_FLOOR, what,
                  f"is below {NOISE_STD_FLOOR:g}, too small", hint, path, offset)


def require_representable_radius(noise_std, measured: int, what: str, hint: str, path=None,
                                 offset: int = 0) -> None:
    """Refuse noise levels whose discrepancy radius ``sigma sqrt(M)`` (``measured``: ``M``) has
    a square beyond float32's range, as a measurement's norm may not: it would be Inf, and
    every image would fit. Arguments as :func:`require_resolvable_noise`'s."""
    values = np.asarray(noise_std, dtype=np.float64)
    _refuse_first(values, ~(np.square(values.reshape(-1)) * measured <= FLOAT32_MAX), what,
                  f"gives a discrepancy radius sigma * sqrt({measured}) too large", hint, path,
                  offset)


def overflows_float32(block: np.ndarray) -> bool:
    """Whether any sample of ``block`` overflows (:func:`samples_overflowing_float32`)."""
    return bool(samples_overflowing_float32(block).any())


def unit_range_doubt(low: float, high: float) -> str | None:
    """What is doubtful about images whose values span ``[low, high]``: ``None`` when that is
    [0, 1] (up to rounding), as the contract's images are nominally, and reaches beyond 1% of
    it (ground truth scaled to 1e-10 would score PSNRs near 200 dB without a word)."""
    faint = max(-low, high) < 0.01
    if low >= -0.01 and high <= 1.01 and not faint:
        return None
    where = "within 1% of 0" if faint else "not [0, 1]"
    return (f"the images take values in [{low:.4g}, {high:.4g}], {where}: PSNR and SSIM "
            "use a data range of 1 (scale the images to [0, 1]; drip scales uint8 and uint16 only)")


def check_dataset(handle, name: str, shape: tuple, path, dtype_kinds: str = "f",
                  finite: bool = True, positive: bool = False, on_block=None) -> h5py.Dataset:
    """Check that dataset ``name`` has ``shape`` (``None`` entries are free), a dtype of one of
    ``dtype_kinds`` and (streaming through it) only finite / positive values; ``on_block(block)``
    sees each block of rows read on the way (after its checks), so that a caller can collect
    more in the same pass."""
    if name not in handle:
        raise DripError(f"missing dataset '{name}'", path)
    dset = handle[name]
    if not isinstance(dset, h5py.Dataset):
        raise DripError(f"'{name}' is not a dataset", path)
    if len(dset.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, dset.shape)):
        free = ["?" if s is None else str(s) for s in shape]
        want = f"({free[0]},)" if len(free) == 1 else "(" + ", ".join(free) + ")"
        raise DripError(f"dataset '{name}' has shape {dset.shape}, expected {want}", path)
    if dset.dtype.kind not in dtype_kinds:
        raise DripError(f"dataset '{name}' has dtype {dset.dtype}, expected a "
                        f"{'floating-point' if dtype_kinds == 'f' else 'numeric'} type", path)
    if finite or positive or on_block is not None:
        for start in range(0, dset.shape[0] if dset.ndim else 1, SCAN_ROWS):
            block = np.asarray(dset[start:start + SCAN_ROWS] if dset.ndim else dset[()])
            if finite and overflows_float32(block):   # one pass in the common, valid case
                if not np.all(np.isfinite(block)):
                    raise DripError(f"dataset '{name}' contains NaN or Inf "
                                    f"({first_sample_where(~np.isfinite(block), start)})", path)
                where = first_sample_where(samples_overflowing_float32(block), start)
                raise DripError(f"dataset '{name}' holds values too large for float32 arithmetic "
                                f"(a sample's squared norm exceeds {FLOAT32_MAX:.3g}; {where}): "
                                "rescale the data", path)
            if positive and not np.all(block > 0):
                raise DripError(f"dataset '{name}' must be > 0 everywhere (noise std; "
                                f"{first_sample_where(~(block > 0), start)})", path)
            if on_block is not None:
                on_block(block)
    return dset


def first_sample_where(bad: np.ndarray, start: int) -> str:
    """The words ``first at sample I``, ``I`` the first row of a block of rows (the block's
    first is row ``start``) where ``bad`` holds anywhere; a scalar dataset is one row."""
    rows = bad.reshape(len(bad), -1).any(1) if bad.ndim else np.atleast_1d(bad)
    return f"first at sample {start + int(np.argmax(rows))}"


@dataclass
class MeasurementBatch:
    """Samples ``start:stop`` of a measurement file, as float32 NumPy arrays."""

    start: int
    stop: int
    measurements: np.ndarray
    noise_std: np.ndarray | None   # None only where the file was opened without noise levels
    ground_truth: np.ndarray | None


class MeasurementFile:
    """A validated measurement file, read lazily in batches.

    Everything the contract lists is checked on open: format attributes, the operator group,
    dataset ranks, shapes against the operator, dtypes, finiteness and ``noise_std > 0``. A
    ground truth outside [0, 1] is allowed but raises a :class:`DripWarning` (PSNR and SSIM
    assume that range).
    ``noise_std`` (a scalar) replaces the file's noise levels. ``noise_levels`` says what the
    caller needs of them: ``"required"`` (the default: a file without them needs ``noise_std``),
    ``"optional"`` (:attr:`noise_std` is None where there are none) or ``"ignored"`` (they are
    neither read nor checked, and :attr:`noise_std` is None: a caller that simulates its own
    noise from the ground truth).
    """

    def __init__(self, path: str | os.PathLike, noise_std: float | None = None,
                 require_ground_truth: bool = False, noise_levels: str = "required"):
        if noise_levels not in ("required", "optional", "ignored"):
            raise ValueError(f"noise_levels = {noise_levels!r}")
        self.path = Path(path)
        self._handle = open_h5(self.path, "measurements")
        try:
            with reading(self.path):
                self._validate(noise_std, require_ground_truth, noise_levels)
        except BaseException:
            self._handle.close()
            raise

    def _validate(self, noise_std, require_ground_truth, noise_levels) -> None:
        h, path = self._handle, self.path
        if "operator" not in h or not isinstance(h["operator"], h5py.Group):
            raise DripError("missing group 'operator'", path)
        try:
            measurement_shape = stored_measurement_shape(h["operator"])
        except ValueError as exc:
            raise DripError(f"invalid operator: {exc}", path) from exc
        # the datasets first: building the operator of a damaged image_shape could take minutes
        self._measurements = check_dataset(h, "measurements", (None, *measurement_shape), path)
        try:
            self.operator: LinearOperator = operator_from_hdf5(h["operator"])
        except ValueError as exc:
            raise DripError(f"invalid operator: {exc}", path) from exc
        op = self.operator
        n = self._measurements.shape[0]
        if n < 1:
            raise DripError("dataset 'measurements' holds no samples", path)
        self._ground_truth = None
        if "ground_truth" in h:
            extremes = [np.inf, -np.inf]

            def track(block):
                extremes[0] = min(extremes[0], float(block.min()))
                extremes[1] = max(extremes[1], float(block.max()))

            self._ground_truth = check_dataset(h, "ground_truth", (n, *op.image_shape), path,
                                               on_block=track)
            doubt = unit_range_doubt(*extremes)
            if doubt is not None:
                warnings.warn(DripWarning(f"{path}: ground truth: {doubt}"), stacklevel=2)
        elif require_ground_truth:
            raise DripError("missing dataset 'ground_truth' (needed here)", path)
        self.noise_std = None
        if noise_std is not None:
            if not np.isfinite(noise_std) or noise_std <= 0:
                raise DripError(f"--noise-std must be a positive number, got {noise_std}", path)
            require_resolvable_noise(noise_std, "--noise-std", "rescale the measurements", path)
            require_representable_radius(noise_std, op.measured_count, "--noise-std",
                                         "is it in the measurements' units?", path)
            self.noise_std = np.full(n, noise_std, dtype=np.float32)
        elif noise_levels == "ignored":
            pass
        elif "noise_std" in h:
            self.noise_std = np.asarray(
                check_dataset(h, "noise_std", (n,), path, positive=True)[()], dtype=np.float32)
            hint = "rescale the measurements and their noise levels alike"
            require_resolvable_noise(self.noise_std, "its noise std", hint, path)
            require_representable_radius(self.noise_std, op.measured_count, "its noise std",
                                         hint, path)
        elif noise_levels == "required":
            raise DripError("has no dataset 'noise_std'; give the noise level with --noise-std", path)
        self.n_samples = n

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.operator.image_shape

    @property
    def has_ground_truth(self) -> bool:
        return self._ground_truth is not None

    def batches(self, batch_size: int, stop: int | None = None) -> Iterator[MeasurementBatch]:
        """Samples ``0:stop`` (all by default) in batches of ``batch_size``."""
        stop = self.n_samples if stop is None else min(stop, self.n_samples)
        for start in range(0, stop, batch_size):
            yield self.read(start, min(start + batch_size, stop))

    def read(self, start: int, stop: int) -> MeasurementBatch:
        with reading(self.path):
            truth = None if self._ground_truth is None else \
                np.asarray(self._ground_truth[start:stop], dtype=np.float32)
            return MeasurementBatch(start, stop,
                                    np.asarray(self._measurements[start:stop], dtype=np.float32),
                                    None if self.noise_std is None else self.noise_std[start:stop],
                                    truth)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MeasurementWriter:
    """Create a measurement file sample batch by sample batch; use inside :func:`atomic_h5`."""

    def __init__(self, handle: h5py.File, operator: LinearOperator, n_samples: int,
                 with_ground_truth: bool = True, attrs: dict | None = None,
                 with_noise_std: bool = True):
        handle.attrs["drip_format"] = "measurements"
        handle.attrs["format_version"] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value
        operator.to_hdf5(handle.create_group("operator"))
        rows = max(1, min(n_samples, 64))
        self._datasets = {
            "measurements": handle.create_dataset(
                "measurements", (n_samples, *operator.measurement_shape), "float32",
                chunks=(rows, *operator.measurement_shape), compression="gzip", compression_opts=4),
            "noise_percent": handle.create_dataset("noise_percent", (n_samples,), "float32"),
        }
        if with_noise_std:
            self._datasets["noise_std"] = handle.create_dataset("noise_std", (n_samples,),
                                                                "float32")
        if with_ground_truth:
            self._datasets["ground_truth"] = handle.create_dataset(
                "ground_truth", (n_samples, *operator.image_shape), "float32",
                chunks=(rows, *operator.image_shape), compression="gzip", compression_opts=4)

    def write(self, start: int, **arrays: np.ndarray) -> None:
        """Write samples ``start:start + n`` of each dataset named; ``ValueError`` unless every
        array holds the same ``n`` samples of its dataset's shape, within the file's samples."""
        rows = None
        for name, values in arrays.items():
            dset, values = self._datasets[name], np.asarray(values)
            if rows is None:
                rows = len(values) if values.ndim else 0
            expected = (rows, *dset.shape[1:])
            if values.shape != expected or start + rows > dset.shape[0]:
                raise ValueError(f"{name}: expected shape {expected} at samples {start}:"
                                 f"{start + rows} of {dset.shape[0]}, got {values.shape}")
            dset[start:start + rows] = values


def write_measurement_file(path, operator: LinearOperator, measurements: np.ndarray,
                           noise_std=None, ground_truth: np.ndarray | None = None,
                           noise_percent=None) -> None:
    """Write a whole (small) measurement file at once, for scripts and tests.
    ``measurements`` is ``(N, *operator.measurement_shape)``, ``ground_truth`` ``(N,
    *operator.image_shape)``; ``noise_std`` and ``noise_percent`` hold one number per sample,
    or one for all (without ``noise_std``, drip asks for ``--noise-std``). The file is checked
    as drip reads it before it appears, so nothing is written where it would be refused
    (:class:`DripError`, as :class:`MeasurementFile`'s, or ``ValueError`` for arrays of the
    wrong shape)."""
    n = len(measurements)

    def per_sample(values, name):
        values = np.asarray(values, dtype=np.float32)
        if values.shape not in ((), (n,)):
            raise ValueError(f"{name}: expected one number or {n}, got shape {values.shape}")
        return np.broadcast_to(values, (n,))

    def check(tmp):
        try:
            with warnings.catch_warnings():   # a doubt is for the reader to voice, as ever
                warnings.simplefilter("ignore", DripWarning)
                MeasurementFile(tmp, noise_levels="optional").close()
        except DripError as exc:
            raise DripError(exc.message, path) from None

    with atomic_h5(path, check) as handle:
        writer = MeasurementWriter(handle, operator, n, with_ground_truth=ground_truth is not None,
                                   with_noise_std=noise_std is not None)
        arrays = {"measurements": measurements,
                  "noise_percent": per_sample(np.nan if noise_percent is None else noise_percent,
                                              "noise_percent")}
        if noise_std is not None:
            arrays["noise_std"] = per_sample(noise_std, "noise_std")
        if ground_truth is not None:
            arrays["ground_truth"] = ground_truth
        writer.write(0, **arrays)
