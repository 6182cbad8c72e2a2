"""A dataset of any HDF5 file, named ``FILE.h5::DATASET`` (the separator silx and other
synchrotron tools use), as ``drip simulate`` reads images and ``drip import`` measurements."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import DripError, require_regular_file
from .measurements import file_format, open_failure, reading

DATASET_SEPARATOR = "::"


def split_dataset(source: str | Path) -> tuple[Path, str | None]:
    """``(file, dataset)`` of ``FILE::DATASET``; ``(source, None)`` for any other path (one
    that exists is a path, whatever its name). Where a name holds the separator more than once,
    the file is the shortest leading part that exists (the first part where none does)."""
    parts = str(source).split(DATASET_SEPARATOR)
    if len(parts) == 1 or os.path.lexists(source):
        return Path(source), None
    cut = next((i for i in range(1, len(parts))
                if os.path.lexists(DATASET_SEPARATOR.join(parts[:i]))), 1)
    dataset = DATASET_SEPARATOR.join(parts[cut:]).strip("/")
    return Path(DATASET_SEPARATOR.join(parts[:cut])), dataset or None


def names_dataset(source: str | Path) -> bool:
    """Whether ``source`` is ``FILE::DATASET``."""
    return split_dataset(source)[1] is not None


def is_hdf5_file(path: str | Path) -> bool:
    try:
        return os.path.isfile(path) and h5py.is_hdf5(path)
    except OSError:   # unreadable: the reader says what is wrong with it
        return False


def is_dataset_source(source: str | Path) -> bool:
    """Whether ``source`` names an HDF5 dataset: ``FILE::DATASET``, or an HDF5 file (of one
    dataset)."""
    return names_dataset(source) or is_hdf5_file(source)


def dataset_names(handle: h5py.File) -> list[str]:
    """The names of every dataset in ``handle``, groups searched."""
    names = []
    handle.visititems(lambda name, item: names.append(name)
                      if isinstance(item, h5py.Dataset) else None)
    return names


def listed_datasets(handle: h5py.File, names: list[str] | None = None) -> str:
    """The datasets of ``handle`` (``names``, or all; the first six) with their shapes."""
    names = dataset_names(handle) if names is None else names
    shown = ", ".join(f"{name} {handle[name].shape}" for name in names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def open_dataset(source: str | Path, what: str, defaults: tuple[str, ...] = (),
                 kinds: str | None = "fiu"):
    """``(handle, dataset)``: the dataset that ``source`` names (``FILE::DATASET``), or else
    the first of ``defaults`` in the file, or (without ``defaults``) the file's only dataset,
    unless the file is a drip file; its dtype one of NumPy's ``kinds`` (None: any, for a
    caller with checks of its own). :class:`DripError` naming the file (and listing its
    datasets where the name is missing or wrong) for anything else. Close ``handle`` when
    done."""
    path, name = split_dataset(source)
    if not path.exists():
        raise DripError("no such file", path)
    require_regular_file(path, f"an HDF5 file of {what}")
    if not is_hdf5_file(path):
        raise DripError(f"not an HDF5 file ({DATASET_SEPARATOR}DATASET names a dataset of one)",
                        path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise open_failure(exc, path) from exc
    try:
        dataset = _dataset(handle, path, name, what, defaults)
        if kinds is not None and dataset.dtype.kind not in kinds:
            raise DripError(f"cannot read {what}: dataset {dataset.name.lstrip('/')!r} holds "
                            f"dtype {dataset.dtype}, expected real numbers"
                            f"{' or booleans' * ('b' in kinds)}", path)
        return handle, dataset
    except BaseException:
        handle.close()
        raise


def _dataset(handle: h5py.File, path: Path, name: str | None, what: str,
             defaults: tuple[str, ...]) -> h5py.Dataset:
    named = f"{path}{DATASET_SEPARATOR}DATASET"
    if name is None and defaults:
        name = next((n for n in defaults if n in handle), None)
        if name is None:
            names = dataset_names(handle)
            raise DripError(f"has no {' or '.join(map(repr, defaults))} dataset"
                            + (f" (its datasets: {listed_datasets(handle, names)}; name one "
                               f"as {named})" if names else ""), path)
    elif name is None:
        if file_format(handle) is not None:
            raise DripError(f"is a drip {file_format(handle).removesuffix('s')} file: name "
                            f"the dataset to read in it, as {named}", path)
        names = dataset_names(handle)
        if not names:
            raise DripError("holds no dataset", path)
        if len(names) > 1:
            raise DripError(f"holds {len(names)} datasets ({listed_datasets(handle, names)}): "
                            f"name the one of the {what} as {named}", path)
        name = names[0]
    if not isinstance(handle.get(name), h5py.Dataset):   # the file listed only here
        names = dataset_names(handle)
        found = f"{name!r} is a group" if name in handle else f"has no dataset {name!r}"
        raise DripError(found + (f" (its datasets: {listed_datasets(handle, names)})" if names
                                 else " (nor any other)"), path)
    dataset = handle[name]
    if dataset.shape is None:
        raise DripError(f"dataset {name!r} is empty (it has no shape)", path)
    return dataset


def subset_index(shape: tuple[int, ...], subset: tuple[int, slice] | None, source) -> tuple:
    """The index of an array of ``shape`` that keeps the slices ``subset = (axis, slice)``
    (``--slices``; every value without one), so that only they are read; ``DripError`` where
    the array has no such axis (axis 0: a stack of at least 3 axes, as one sinogram or image
    has no slices to pick), or the slice keeps none of it or goes past its end."""
    if subset is None:
        return ()
    axis, kept = subset
    if not -len(shape) <= axis < len(shape) or (axis == 0 and len(shape) < 3):
        raise DripError(f"has shape {tuple(shape)}, which holds no stack of slices for "
                        "--slices to pick from", source)
    count = shape[axis]
    if not range(count)[kept]:
        raise DripError(f"--slices {kept.start}:{kept.stop} keeps none of its {count} slices "
                        f"(counted from 0, the stop excluded)", source)
    if kept.stop > count:   # not cut short in silence: a range past the end names another stack
        raise DripError(f"--slices {kept.start}:{kept.stop} goes past the end of its {count} "
                        f"slices (0 to {count - 1}; the stop excluded, so at most "
                        f"{kept.start}:{count})", source)
    index = [slice(None)] * len(shape)
    index[axis] = kept
    return tuple(index)


def read_dataset(source: str | Path, what: str, booleans: bool = False,
                 subset: tuple[int, slice] | None = None) -> np.ndarray:
    """The values of the dataset ``source`` names (``FILE::DATASET``, or the file's only
    dataset), as stored: real numbers (or, with ``booleans``, booleans too); only the slices
    ``subset`` keeps (:func:`subset_index`)."""
    handle, dataset = open_dataset(source, what, kinds="fiu" + "b" * booleans)
    with handle, reading(split_dataset(source)[0]):
        return np.asarray(dataset[subset_index(dataset.shape, subset, source)])
