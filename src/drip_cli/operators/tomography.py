"""Parallel-beam Radon transform in the geometry of ``skimage.transform.radon(circle=False)``.

scikit-image pads the image with zeros to a square of side ``P = s + ceil(sqrt(2) max(H, W) - s)``
(centred as ``np.pad`` with ``pad_before = (s + pad)//2 - s//2``), rotates it about pixel
``P // 2`` with bilinear interpolation, and sums each rotated column: detector ``t`` of angle
``theta`` is ``sum_r x_pad(y(r, t), x(r, t))`` with

    x = cos(theta) t + sin(theta) r - c (cos(theta) + sin(theta) - 1)
    y = -sin(theta) t + cos(theta) r - c (cos(theta) - sin(theta) - 1),     c = P // 2.

Here that sum is assembled once into a sparse matrix (rows ``angle * P + t``, columns the image
pixels), so forward and adjoint are exact sparse products, differentiable and batched, on any
image size and any set of angles (limited angle by choice of angles). Measurements are
``(n_angles, P)``: rows are angles, the transpose of scikit-image's layout.

Extension of the contract: ``n_detectors = D`` other than ``P``, the detectors ``t = P // 2 -
D // 2 + j`` (``j < D``) of the same line, centred on the rotation centre. Fewer than ``P``
measure a larger image than the detector covers whole (the object extends beyond the band the
detector sees at some angles: the image's corners); more than ``P`` add detectors beyond the
line, which measure nothing with the axis centred (zero rows: the image's shadow ends within
the line) and the rays an axis off centre moves beyond it. Without the attribute, or with ``D =
P``, the operator is the contract's.

Extension of the contract: ``center_offset = d`` (detector pixels, any real number below ``P /
2`` in size), the rotation axis projected onto detector ``P // 2 + d`` instead of ``P // 2``, as
when a scanner's axis is off the detector's centre: detector ``t`` then sums the ray that
detector ``t - d`` sums without it (in the formula above, ``t - d`` for ``t``), interpolated for
a fractional ``d`` (with a window of ``D`` detectors, the axis falls on its detector ``D // 2 +
d``). Only written where ``d`` is not 0, so files without it are the contract's.
"""

from __future__ import annotations

import math

import numpy as np

from .sparse import SparseMatrixOperator, _csr


# a detector window holds between 1 / DETECTOR_FACTOR and DETECTOR_FACTOR times the image's own
# detectors: a damaged file's image_shape cannot then pass with its n_detectors and build the
# Radon matrix of a huge image (30000x30000 for 29 detectors) before the shapes disagree
DETECTOR_FACTOR = 4


def detector_range(side: int) -> tuple[int, int]:
    """The numbers of detectors allowed for an image of ``side`` detectors (``DETECTOR_FACTOR``)."""
    return max(1, math.ceil(side / DETECTOR_FACTOR)), DETECTOR_FACTOR * side


def radon_geometry(height: int, width: int) -> tuple[int, tuple[int, int]]:
    """Side ``P`` of the padded square (= number of detectors) and the padding before (rows, cols)."""
    diagonal = math.sqrt(2) * max(height, width)
    pads = [int(math.ceil(diagonal - s)) for s in (height, width)]
    sides = [s + p for s, p in zip((height, width), pads)]
    if sides[0] != sides[1]:  # cannot happen for scikit-image's rule, kept as a guard
        raise ValueError(f"padded image is not square: {sides}")
    before = tuple((s + p) // 2 - s // 2 for s, p in zip((height, width), pads))
    return sides[0], before


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``keys`` in increasing order, and the ``weights`` of each summed in their
    order of appearance: what ``np.unique(keys, return_inverse=True)`` and a ``np.bincount``
    over the inverse give, bit for bit. A stable sort, which is fast on keys that come in long
    increasing runs, as :func:`radon_matrix` makes them."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(len(keys), dtype=bool)   # where a new key starts
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first], np.bincount(np.cumsum(first) - 1, weights=weights[order])


def radon_matrix(height: int, width: int, angles_deg: np.ndarray, center_offset: float = 0.0,
                 detectors: int | None = None):
    """CSR arrays ``(indptr, indices, data, shape)`` of the Radon transform of an ``H x W`` image
    on ``detectors`` detectors (default ``P``; the module docstring), the rotation axis on
    detector ``detectors // 2 + center_offset``."""
    side, (pad_r, pad_c) = radon_geometry(height, width)
    detectors = side if detectors is None else detectors
    pixels = height * width
    centre = side // 2
    # detector-major: each angle's keys (detector * pixels + pixel) come in runs that are
    # mostly in order already, so their stable sort is quick (384 x 384 images at 180 angles:
    # 5.2-6.1 s to build the matrix, against 12.9 s with the samples ray-position-major and
    # np.unique). Within a detector, the samples that touch one pixel appear in the same order
    # either way (by corner, then along the ray), so the sums are the same, bit for bit.
    # each detector's position on the contract's line (a window's, centred), and the position
    # of the ray it sums there (a whole offset: another detector's ray); a window wider than the
    # line measures the rays beyond it too, which an off-centre axis brings into the image
    positions = side // 2 - detectors // 2 + np.arange(detectors, dtype=np.float64)
    grid_t, grid_r = np.meshgrid(positions - center_offset, np.arange(side, dtype=np.float64),
                                 indexing="ij")
    rows = np.broadcast_to(np.arange(detectors)[:, None], grid_t.shape)
    indptr_parts, index_parts, data_parts = [np.zeros(1, dtype=np.int64)], [], []
    offset = 0
    for angle in np.deg2rad(np.asarray(angles_deg, dtype=np.float64)):
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        src_x = cos_a * grid_t + sin_a * grid_r - centre * (cos_a + sin_a - 1)
        src_y = -sin_a * grid_t + cos_a * grid_r - centre * (cos_a - sin_a - 1)
        x0, y0 = np.floor(src_x), np.floor(src_y)
        fx, fy = src_x - x0, src_y - y0
        keys, weights = [], []
        for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                          (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            row = (y0 + dy).astype(np.int64) - pad_r
            col = (x0 + dx).astype(np.int64) - pad_c
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width) & (w > 0)
            keys.append(rows[inside] * pixels + row[inside] * width + col[inside])
            weights.append(w[inside])
        # the entries of this angle's rows, duplicates summed, in (detector, pixel) order; a
        # bincount over every possible key allocated side x pixels floats per angle (190 MB
        # for 256 x 256 images, 1.5 GB for 512 x 512), where the entries number about 4 side^2
        nonzero, summed = _sum_by_key(np.concatenate(keys), np.concatenate(weights))
        counts = np.bincount(nonzero // pixels, minlength=detectors)
        indptr_parts.append(offset + np.cumsum(counts))
        offset += len(nonzero)
        index_parts.append((nonzero % pixels).astype(np.int32 if pixels < 2**31 else np.int64))
        data_parts.append(summed)
    indptr = np.concatenate(indptr_parts)
    indices = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    data = np.concatenate(data_parts) if data_parts else np.zeros(0)
    return indptr, indices, data, (len(angles_deg) * detectors, pixels)


def limited_angles(n_angles: int, angle_range: float = 180.0, start: float = 0.0) -> np.ndarray:
    """``n_angles`` equispaced angles in degrees over ``[start, start + angle_range)``."""
    if n_angles < 1:
        raise ValueError("the number of angles must be at least 1")
    if not 0 < angle_range <= 360:
        raise ValueError("the angle range must be in (0, 360] degrees")
    return start + angle_range * np.arange(n_angles, dtype=np.float64) / n_angles


def _checked_angles(angles_deg) -> np.ndarray:
    """``angles_deg`` as a float64 array; ``ValueError`` unless it is a non-empty 1-D array of
    finite angles (a file's angles are checked before its measurements' shape is compared)."""
    try:
        angles = np.atleast_1d(np.asarray(angles_deg, dtype=np.float64))
    except (TypeError, ValueError):
        angles = np.empty((0,))
    if angles.ndim != 1 or len(angles) == 0 or not np.all(np.isfinite(angles)):
        raise ValueError("angles_deg must be a non-empty 1-D array of finite angles")
    return angles


class Tomography(SparseMatrixOperator):
    """Parallel-beam Radon transform per channel; measurements ``(C, n_angles, n_detectors)``
    (``n_detectors``: by default the image's own, ``P``; another count is a centred window of
    that detector line, the module docstring)."""

    kind = "tomography"

    def __init__(self, image_shape: tuple[int, int, int], angles_deg,
                 n_detectors: int | None = None, center_offset: float = 0.0):
        angles = _checked_angles(angles_deg)
        _, height, width = (int(v) for v in image_shape)
        side = radon_geometry(height, width)[0]
        detectors = side if n_detectors is None else int(n_detectors)
        low, high = detector_range(side)
        if not low <= detectors <= high:
            raise ValueError(f"{detectors} detectors for a {height}x{width} image, whose "
                             f"diagonal spans {side}: give {low} to {high}")
        center_offset = float(center_offset)
        if not abs(center_offset) < side / 2:   # NaN too
            raise ValueError(f"the centre offset must be below {side / 2:g} detectors in size "
                             f"(half the {side} of a {height}x{width} image), got "
                             f"{center_offset:g}")
        indptr, indices, data, shape = radon_matrix(height, width, angles, center_offset,
                                                    detectors)
        self.angles_deg = angles
        self.n_detectors = detectors
        self.center_offset = center_offset
        super().__init__(image_shape, _csr(indptr, indices, data, shape),
                         measurement_size=(len(angles), self.n_detectors))

    def _write_hdf5(self, group) -> None:
        group.create_dataset("angles_deg", data=self.angles_deg)
        group.attrs["n_detectors"] = self.n_detectors
        if self.center_offset != 0:
            group.attrs["center_offset"] = self.center_offset

    @staticmethod
    def _stored_offset(group) -> float:
        """The stored ``center_offset`` (0 without one); ``ValueError`` unless one finite number
        (its size is checked where the operator is built)."""
        if "center_offset" not in group.attrs:
            return 0.0
        values = np.asarray(group.attrs["center_offset"]).ravel()
        if len(values) != 1 or values.dtype.kind not in "iuf" or not np.isfinite(values[0]):
            raise ValueError("operator attribute 'center_offset' must be one finite number, got "
                             f"{str(group.attrs['center_offset'])[:40]}")
        return float(values[0])

    @classmethod
    def _stored_geometry(cls, group, image_shape) -> tuple[np.ndarray, int]:
        """The stored angles, checked, and the number of detectors: the stored ``n_detectors``
        (within :func:`detector_range` of the image's own), or the image's own without one."""
        angles = _checked_angles(cls._stored_array(group, "angles_deg"))
        detectors = radon_geometry(*image_shape[1:])[0]
        if "n_detectors" in group.attrs:
            stored = cls._stored_integers(group, "n_detectors", 1)[0]
            low, high = detector_range(detectors)
            if not low <= stored <= high:
                raise ValueError(f"n_detectors = {stored}, but an image of size "
                                 f"{image_shape[1:]} has {detectors} detectors in the "
                                 f"radon(circle=False) geometry (a centred window of {low} to "
                                 f"{high} is allowed)")
            detectors = stored
        return angles, detectors

    @classmethod
    def _stored_measurement_size(cls, group, image_shape):
        angles, detectors = cls._stored_geometry(group, image_shape)
        return len(angles), detectors

    @classmethod
    def _read_hdf5(cls, group, image_shape):
        return cls(image_shape, *cls._stored_geometry(group, image_shape),
                   center_offset=cls._stored_offset(group))

    @property
    def full_detectors(self) -> int:
        """The contract's number of detectors for this image, ``P`` (its diagonal's)."""
        return radon_geometry(*self.image_shape[1:])[0]

    def describe(self) -> dict:
        a = self.angles_deg
        window = ({} if self.n_detectors == self.full_detectors else
                  {"detector window": f"{self.n_detectors} of the image's "
                                      f"{self.full_detectors}, centred"})
        offset = ({} if self.center_offset == 0 else
                  {"center_offset": f"{self.center_offset:g} detectors (the rotation axis on "
                                    f"detector {self.n_detectors // 2 + self.center_offset:g}"
                                    ")"})
        return {**super().describe(), "n_angles": len(a), "n_detectors": self.n_detectors,
                **window, **offset, "angles_deg": f"{a.min():.4g} .. {a.max():.4g}"}
