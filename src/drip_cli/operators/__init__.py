"""Forward operators with exact adjoints; :func:`operator_from_hdf5` rebuilds one from a file."""

from __future__ import annotations

import numpy as np

from .base import LinearOperator, adjointness_error, estimate_norm, norm_bound
from .blur import Blur, gaussian_psf, gaussian_psf_size
from .simple import Denoise, Inpainting
from .sparse import SparseMatrixOperator, load_matrix_file
from .tomography import Tomography, limited_angles

# the kinds whose measurements are images: pictures can hold them, drip export writes them
IMAGE_MEASUREMENT_KINDS = ("denoise", "blur", "inpainting")

OPERATORS: dict[str, type[LinearOperator]] = {
    cls.kind: cls for cls in (Denoise, Blur, Inpainting, Tomography, SparseMatrixOperator)
}


def stored_kind(group):
    """The ``kind`` attribute of an h5py ``operator`` group as stored (bytes decoded), unchecked:
    None where it is missing."""
    kind = group.attrs.get("kind")
    return kind.decode(errors="replace") if isinstance(kind, bytes) else kind


def _stored_kind_and_shape(group) -> tuple[type[LinearOperator], tuple[int, int, int]]:
    """The operator class and ``image_shape`` an h5py ``operator`` group names (``ValueError``,
    with a message fit for users, when they are malformed)."""
    kind = stored_kind(group)
    if kind is None:
        raise ValueError("operator group lacks attribute 'kind'")
    if not isinstance(kind, str) or kind not in OPERATORS:
        shown = kind if isinstance(kind, str) else np.asarray(kind).tolist()
        raise ValueError(f"unknown operator kind {shown!r} (known: {', '.join(OPERATORS)})")
    try:
        image_shape = LinearOperator._stored_integers(group, "image_shape", 3)
    except ValueError as exc:
        raise ValueError(f"{exc} ([C, H, W])") from None
    if min(image_shape) < 1:
        raise ValueError(f"operator image_shape must be [C, H, W], got {list(image_shape)}")
    return OPERATORS[kind], image_shape


def stored_measurement_shape(group) -> tuple[int, ...]:
    """The measurement shape ``(C, *S)`` of the operator stored in an h5py ``operator`` group,
    without building the operator: a reader checks its datasets against it first, so that a
    damaged ``image_shape`` is refused at once instead of building an operator for a huge
    image (a 30000x30000 tomography matrix). Raises ``ValueError`` as
    :func:`operator_from_hdf5` does."""
    cls, image_shape = _stored_kind_and_shape(group)
    return (image_shape[0], *cls._stored_measurement_size(group, image_shape))


def operator_from_hdf5(group) -> LinearOperator:
    """Rebuild the operator stored in an h5py ``operator`` group.

    Raises ``ValueError`` (with a message fit for users) when the group is malformed.
    """
    cls, image_shape = _stored_kind_and_shape(group)
    return cls._read_hdf5(group, image_shape)


__all__ = [
    "LinearOperator", "Denoise", "Blur", "Inpainting", "Tomography", "SparseMatrixOperator",
    "OPERATORS", "IMAGE_MEASUREMENT_KINDS", "operator_from_hdf5", "stored_kind",
    "stored_measurement_shape", "adjointness_error", "estimate_norm", "norm_bound",
    "gaussian_psf", "gaussian_psf_size", "limited_angles", "load_matrix_file",
]
