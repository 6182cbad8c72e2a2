"""Outputs appear whole or not at all: write to a temporary file beside the target, then
``os.replace`` it into place. Any failure (including Ctrl-C) removes the temporary file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import h5py

from ..errors import DripError


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_writable(path: str | os.PathLike, keep: dict | None = None) -> Path:
    """Fail early, naming ``path``, when its folder is missing or not writable, or when it is
    one of the files in ``keep`` (``{what it is: path or None}``: the command's inputs and
    other outputs, which writing ``path`` would replace)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DripError("is a folder, expected a file name", path)
    for role, other in (keep or {}).items():
        if other is not None and _same_file(path, Path(other)):
            raise DripError(f"cannot write output: this is {role}; choose another name", path)
    if not folder.is_dir():
        raise DripError(f"cannot write output: folder {folder} does not exist", path)
    if not os.access(folder, os.W_OK):
        raise DripError(f"cannot write output: folder {folder} is not writable", path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in ``path``'s folder; on success move it onto ``path``."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DripError(f"cannot write output: {exc.strerror}", path) from exc
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike):
    """An ``h5py.File`` opened for writing that becomes ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            yield handle


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _strict(value):
    """``value`` with every non-finite float as ``None``: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def write_json(path: str | os.PathLike, value) -> None:
    """Write ``value`` as indented, standard JSON (a NaN or infinite figure as ``null``)."""
    write_text(path, json.dumps(_strict(value), indent=2, allow_nan=False) + "\n")
