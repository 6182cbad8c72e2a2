"""Reconstruction files (CONTRACT.md, ``drip_format = "reconstructions"``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import DripError
from .measurements import FORMAT_VERSION, check_dataset, open_h5, reading

PER_SAMPLE = {  # dataset -> dtype; psnr/ssim only when ground truth is known
    "discrepancy_ratio": "float64",
    "relative_residual": "float64",
    "regularizer_value": "float64",
    "iterations": "int64",
    "converged": "bool",
    "solver_converged": "bool",
    "seconds": "float64",
}
QUALITY = {"psnr": "float64", "ssim": "float64"}


class ReconstructionWriter:
    """Fill a reconstruction file batch by batch; use inside :func:`atomic_h5`.

    ``reconstructions`` is chunked by sample so that readers can stream it.
    """

    def __init__(self, handle: h5py.File, n_samples: int, image_shape: tuple[int, int, int],
                 with_quality: bool, attrs: dict):
        handle.attrs["drip_format"] = "reconstructions"
        handle.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            handle.attrs[key] = value
        rows = max(1, min(n_samples, 64))
        self._datasets = {"reconstructions": handle.create_dataset(
            "reconstructions", (n_samples, *image_shape), "float32", chunks=(rows, *image_shape))}
        columns = {**PER_SAMPLE, **(QUALITY if with_quality else {})}
        for name, dtype in columns.items():
            self._datasets[name] = handle.create_dataset(name, (n_samples,), dtype)

    def write(self, start: int, **arrays: np.ndarray) -> None:
        for name, values in arrays.items():
            self._datasets[name][start:start + len(values)] = values

    def columns(self) -> dict[str, np.ndarray]:
        """The per-sample columns (everything but the images), read back once all are written."""
        return {name: dataset[()] for name, dataset in self._datasets.items()
                if name != "reconstructions"}


def read_reconstruction_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Attributes and per-sample columns of a reconstruction file (not the images)."""
    path = Path(path)
    with open_h5(path, "reconstructions") as handle, reading(path):
        images = check_dataset(handle, "reconstructions", (None,) * 4, path, finite=False)
        n = images.shape[0]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
        if "tau" in attrs:
            try:
                attrs["tau"] = float(attrs["tau"])
            except (TypeError, ValueError):
                attrs["tau"] = math.nan
            if not attrs["tau"] > 0:
                raise DripError(f"attribute tau = {handle.attrs['tau']!r} is not a positive number",
                                path)
        columns = {}
        for name in ("discrepancy_ratio", "relative_residual", "regularizer_value", "iterations",
                     "converged", "solver_converged", "seconds", "psnr", "ssim"):
            if name in handle:
                columns[name] = np.asarray(check_dataset(handle, name, (n,), path, dtype_kinds="fiub",
                                                         finite=False)[()])
        attrs["n_samples"] = n
        attrs["image_shape"] = list(images.shape[1:])
        return attrs, columns
