"""``drip export``: the images of a drip file as PNG files, to look at or to hand to other tools
(or as a ``.npy`` array or a float TIFF stack, below).

A reconstruction file gives its ``reconstructions``; a measurement file its ``ground_truth``,
or its ``measurements`` where those are images (the identity, blur and inpainting operators;
a sinogram or a sparse operator's data is not one). Intensities are the contract's, nominally
in [0, 1]: they are clipped to that range (the summary says how many pixels were) and stored
in 8 bits, or in 16 for grayscale images, which ``drip simulate FOLDER`` reads back to within
half a step of 1/65535 (8 bits: of 1/255). One file per sample, ``NAME_INDEX.png`` with the
dataset's name and the sample's index, zero-padded so the names sort as the samples do. The
folder gets every file or none: they are written to a staging folder beside it and moved in
at the end (:func:`~drip_cli.io.atomic.atomic_folder`). Given a ``NAME.png`` path instead, the
one image (of a file of one sample, or the first with ``max_samples = 1``) is written there.

Given a ``.npy`` path instead of a folder, the dataset is written as one array, ``(N, C, *S)``,
with its values as stored (neither clipped nor rounded), and of a measurement file any
operator's measurements: a sinogram or a sparse operator's data too. ``drip import`` reads
such an array back, and NumPy (``np.load``) or any other tool reads it without drip.

Given a ``.tif`` or ``.tiff`` path, grayscale images, or measurements of two axes (a sinogram
too), are written as one multi-page TIFF of 32-bit floats, a page per sample, with the values
as stored: the form ImageJ / Fiji and most microscopy and CT software read as a stack, and
``drip simulate`` and ``drip import`` read back exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .errors import DripError
from .info import file_kind
from .io import atomic_folder, atomic_path
from .io.measurements import check_dataset, open_h5, reading
from .operators import IMAGE_MEASUREMENT_KINDS, stored_kind, stored_measurement_shape

# each file kind's datasets that hold images, its default first
IMAGE_DATASETS = {"reconstructions": ("reconstructions",),
                  "measurements": ("ground_truth", "measurements")}
BITS = (8, 16)


def _quantised(image: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """``image`` (``(C, H, W)`` float) clipped to [0, 1] and rounded to ``bits`` bits, as
    Pillow takes it (``(H, W)`` or ``(H, W, 3)``), and the number of pixel values clipped."""
    clipped = int(np.count_nonzero((image < 0) | (image > 1)))
    top = 2**bits - 1
    levels = np.rint(np.clip(image, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
    return (levels[0] if len(levels) == 1 else np.moveaxis(levels, 0, -1)), clipped


def _write_png(path: Path, levels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(levels).save(path, format="PNG")


def _file_kind(path: Path, what: str) -> str:
    """The kind of drip file at ``path``, refused where it is a model (no ``what`` in it) or
    a folder (which ``file_kind`` takes for a run folder, and would name a missing model)."""
    if path.is_dir():
        raise DripError("is a folder: export takes a reconstruction or measurement file (HDF5)",
                        path)
    kind = file_kind(path)
    if kind == "model":
        raise DripError(f"a model holds no {what}: export a reconstruction or measurement file",
                        path)
    return kind


def _dataset(handle, kind: str, name: str | None, path: Path, images: bool = True):
    """The dataset to export, checked: ``(N, C, H, W)`` with pixels, floating point (each
    sample's values are checked as it is written: a file is read once). Not ``images``, the
    measurements may be any operator's, shaped ``(N, C, *S)`` as their operator says."""
    allowed = IMAGE_DATASETS[kind]
    name = allowed[0] if name is None else name
    if name not in allowed:
        raise DripError(f"a {kind} file's {'images' if images else 'arrays'} are "
                        f"{' or '.join(allowed)}, not {name!r}", path)
    shape = (None,) * 4
    if name == "measurements":
        if images:
            stored = stored_kind(handle["operator"]) if "operator" in handle else None
            if not (isinstance(stored, str) and stored in IMAGE_MEASUREMENT_KINDS):
                raise DripError(f"the measurements of operator kind {stored!r} are not images "
                                f"(only {', '.join(IMAGE_MEASUREMENT_KINDS)}): export "
                                "ground_truth, or reconstructions of these measurements, or "
                                "the measurements as a .npy array", path)
        elif not isinstance(handle.get("operator"), h5py.Group):
            raise DripError("missing group 'operator'", path)
        else:
            try:
                shape = (None, *stored_measurement_shape(handle["operator"]))
            except ValueError as exc:
                raise DripError(str(exc), path) from None
    dset = check_dataset(handle, name, shape, path, finite=False)   # checked per sample
    if dset.shape[0] < 1 or 0 in dset.shape[2:]:
        raise DripError(f"dataset '{name}' has shape {dset.shape}: no "
                        f"{'images' if images else 'samples'} to write", path)
    return name, dset


# an output named like one of these (and not a folder already) is a file the user meant, not
# the folder of PNG files that any other name makes: ``drip export r.h5 x.png`` made a folder
# x.png of 16 files. A ``.png`` name takes one image, the others are refused.
FILE_LIKE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".h5", ".hdf5",
                      ".npz", ".csv", ".txt", ".json")


def export_pngs(path: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None,
                bits: int = 8, max_samples: int | None = None, progress=None) -> dict:
    """Write the images of ``path`` (its ``dataset``, by default the file's own: see the module
    docstring) into the folder ``out`` as PNG files of ``bits`` bits, the first
    ``max_samples`` of them (all by default); or, where ``out`` is named ``*.png`` (and is no
    folder), the one image it then must be as that file. ``progress(done, total)`` hears of
    each file. Returns a summary: ``folder``, ``dataset``, ``files`` (their names), ``bits``,
    ``channels``, ``clipped`` (the share of pixel values outside [0, 1])."""
    path, out = Path(path), Path(out)
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    file_like = out.suffix.lower() in FILE_LIKE_SUFFIXES and not out.is_dir()
    one_file = file_like and out.suffix.lower() == ".png"
    if file_like and not one_file:
        raise DripError(f"is named as a {out.suffix} file, but drip export writes PNG files "
                        "(into a folder, or one image as NAME.png), a .npy array or a .tif "
                        "stack", out)
    kind = _file_kind(path, "images")
    with open_h5(path, kind) as handle, reading(path):
        name, dset = _dataset(handle, kind, dataset, path)
        n, channels = dset.shape[:2]
        if channels not in (1, 3):
            raise DripError(f"dataset '{name}' has {channels} channels; a PNG holds 1 (grayscale) "
                            "or 3 (colour)", path)
        if bits == 16 and channels == 3:
            raise DripError("16-bit PNG files are written for grayscale images only; export "
                            "colour with --bits 8", path)
        count = n if max_samples is None else min(n, max_samples)
        if one_file and count != 1:
            raise DripError(f"is one PNG file, but dataset '{name}' holds {count} images: "
                            "give --max-samples 1 for the first, or a folder for all", out)
        width = max(4, len(str(n - 1)))   # the names of a part are those of the whole
        values = count * int(np.prod(dset.shape[1:]))
        clipped = 0
        files = [out.name] if one_file else [f"{name}_{i:0{width}d}.png" for i in range(count)]
        with (atomic_path(out) if one_file else atomic_folder(out)) as staging:
            for i in range(count):
                image = _finite(dset, i, name, path).astype(np.float64)
                levels, outside = _quantised(image, bits)
                clipped += outside
                _write_png(Path(staging) if one_file else Path(staging) / files[i], levels)
                if progress is not None:
                    progress(i + 1, count)
    return {"folder": str(out.parent if one_file else out), "dataset": name, "files": files,
            "bits": bits, "channels": channels, "clipped": clipped / values}


def export_tiff(path: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None,
                max_samples: int | None = None, progress=None) -> dict:
    """Write the grayscale images of ``path`` (as :func:`export_pngs` chooses them), or its
    measurements where they have two axes (images, a sinogram), to ``out`` as a multi-page TIFF
    of 32-bit floats, one page per sample, the first ``max_samples`` (all by default), with the
    values as stored, atomically, a page at a time.
    ``progress(done, total)`` hears of each page. Returns a summary: ``file``, ``dataset``,
    ``pages``, ``page shape``."""
    from PIL import Image, TiffImagePlugin

    path = Path(path)
    kind = _file_kind(path, "images")
    with open_h5(path, kind) as handle, reading(path):
        name, dset = _dataset(handle, kind, dataset, path, images=False)
        if len(dset.shape) != 4:
            raise DripError(f"dataset '{name}' holds {len(dset.shape) - 2}-axis samples; a TIFF "
                            "page holds two (export them as a .npy array)", path)
        if dset.shape[1] != 1:
            raise DripError(f"dataset '{name}' has {dset.shape[1]} channels; a TIFF is written "
                            "for grayscale images (export colour as a .npy array, or as PNG "
                            "files)", path)
        count = len(dset) if max_samples is None else min(len(dset), max_samples)
        with atomic_path(out) as tmp, TiffImagePlugin.AppendingTiffWriter(tmp, new=True) as tiff:
            for i in range(count):
                page = _finite(dset, i, name, path)[0].astype(np.float32)
                Image.fromarray(page).save(tiff, format="TIFF")   # mode F
                tiff.newFrame()
                if progress is not None:
                    progress(i + 1, count)
    return {"file": str(out), "dataset": name, "pages": count, "page shape": dset.shape[2:]}


def _finite(dset, i: int, name: str, path: Path) -> np.ndarray:
    """Sample ``i`` of ``dset``, refused where it holds NaN or Inf."""
    sample = np.asarray(dset[i])
    if not np.all(np.isfinite(sample)):
        raise DripError(f"dataset '{name}' holds NaN or Inf at sample {i}: nothing was "
                        "written", path)
    return sample


def export_array(path: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None,
                 max_samples: int | None = None, progress=None) -> dict:
    """Write ``dataset`` of ``path`` (as :func:`export_pngs` chooses it, but measurements of
    any operator) to the ``.npy`` file ``out`` as one array with the values as stored, the
    first ``max_samples`` samples (all by default), atomically. ``progress(done, total)``
    hears of each sample. Returns a summary: ``file``, ``dataset``, ``shape``, ``dtype``."""
    path = Path(path)
    kind = _file_kind(path, "samples")
    with open_h5(path, kind) as handle, reading(path):
        name, dset = _dataset(handle, kind, dataset, path, images=False)
        count = len(dset) if max_samples is None else min(len(dset), max_samples)
        shape, dtype = (count, *dset.shape[1:]), np.dtype(dset.dtype)
        with atomic_path(out) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            try:
                for i in range(count):
                    array[i] = _finite(dset, i, name, path)
                    if progress is not None:
                        progress(i + 1, count)
                array.flush()
            finally:
                del array   # the memory map is closed before the file is moved or removed
    return {"file": str(out), "dataset": name, "shape": shape, "dtype": str(dtype)}
