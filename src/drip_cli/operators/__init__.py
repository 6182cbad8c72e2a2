"""Forward operators with exact adjoints; :func:`operator_from_hdf5` rebuilds one from a file."""

from __future__ import annotations

import numpy as np

from .base import LinearOperator, adjointness_error, estimate_norm
from .blur import Blur, gaussian_psf, gaussian_psf_size
from .simple import Denoise, Inpainting
from .sparse import SparseMatrixOperator, load_matrix_file
from .tomography import Tomography, limited_angles

OPERATORS: dict[str, type[LinearOperator]] = {
    cls.kind: cls for cls in (Denoise, Blur, Inpainting, Tomography, SparseMatrixOperator)
}


def operator_from_hdf5(group) -> LinearOperator:
    """Rebuild the operator stored in an h5py ``operator`` group.

    Raises ``ValueError`` (with a message fit for users) when the group is malformed.
    """
    kind = group.attrs.get("kind")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind is None:
        raise ValueError("operator group lacks attribute 'kind'")
    if not isinstance(kind, str) or kind not in OPERATORS:
        shown = kind if isinstance(kind, str) else np.asarray(kind).tolist()
        raise ValueError(f"unknown operator kind {shown!r} (known: {', '.join(OPERATORS)})")
    if "image_shape" not in group.attrs:
        raise ValueError("operator group lacks attribute 'image_shape'")
    image_shape = np.asarray(group.attrs["image_shape"]).ravel()
    if len(image_shape) != 3 or np.any(image_shape < 1):
        raise ValueError(f"operator image_shape must be [C, H, W], got {image_shape.tolist()}")
    return OPERATORS[kind]._read_hdf5(group, tuple(int(v) for v in image_shape))


__all__ = [
    "LinearOperator", "Denoise", "Blur", "Inpainting", "Tomography", "SparseMatrixOperator",
    "OPERATORS", "operator_from_hdf5", "adjointness_error", "estimate_norm", "gaussian_psf",
    "gaussian_psf_size", "limited_angles", "load_matrix_file",
]
