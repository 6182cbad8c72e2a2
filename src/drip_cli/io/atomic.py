"""Outputs appear whole or not at all: write to a temporary file beside the target, then
``os.replace`` it into place. Any failure (including Ctrl-C) removes the temporary file."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path

import h5py

from ..errors import DripError, OutputError, raise_if_signalled


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    # realpath, not Path.resolve, which raises RuntimeError on a loop of symbolic links
    return os.path.realpath(a) == os.path.realpath(b)


def _refuse_standard_output(path: Path) -> None:
    """``-``, the common name for standard output, would have become a file (or folder) of
    that name: drip's outputs (HDF5 and JSON files, report and picture folders) need a name."""
    if str(path) == "-":
        raise DripError("is not a name drip can write to: its outputs are files and folders, "
                        "not standard output; give a name", path)


def check_writable(path: str | os.PathLike, keep: dict | None = None) -> Path:
    """Fail early, naming ``path``, when its folder is missing or not writable, or when it is
    one of the files in ``keep`` (``{what it is: path or None}``: the command's inputs and
    other outputs, which writing ``path`` would replace)."""
    path = Path(path)
    _refuse_standard_output(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DripError("is a folder, expected a file name", path)
    if path.exists() and not path.is_file():
        # the finished output is renamed onto the name: that would replace the device itself
        raise DripError("is not a regular file (a device or a pipe), which the output would "
                        "replace; give a file name", path)
    from .datasets import split_dataset   # (datasets reads measurement files, which use this)

    for role, other in (keep or {}).items():
        # an input FILE.h5::DATASET is FILE.h5
        if other is not None and _same_file(path, split_dataset(other)[0]):
            raise DripError(f"cannot write output: this is {role}; choose another name", path)
    if not folder.is_dir():
        raise DripError(f"cannot write output: folder {folder} does not exist", path)
    if not os.access(folder, os.W_OK):
        raise DripError(f"cannot write output: folder {folder} is not writable", path)
    return path


def check_folder_writable(folder: str | os.PathLike) -> Path:
    """Fail early, naming ``folder``, when it is a file, or when it (or, where it is still to
    be made, the nearest folder above it that exists) cannot be written: a read-only disk, no
    permission."""
    folder = Path(folder)
    _refuse_standard_output(folder)
    if folder.exists() and not folder.is_dir():
        raise DripError("exists and is not a folder", folder)
    if folder.is_symlink() and not folder.exists():
        raise DripError(f"is a symbolic link to {os.readlink(folder)}, which does not exist: "
                        "make that folder, or give another", folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise DripError(f"cannot write output: {existing} is not a folder", folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DripError(f"cannot write output: folder {existing} is not writable", folder)
    return folder


def _temporary_prefix(name: str) -> str:
    """The start of a temporary file's name beside ``name``: hidden, and short enough that
    the random part and suffix still fit the 255 bytes a file name may have."""
    return f".{name[:100]}."


# The errors that only a write raises: a full disk or quota, a file-size limit, a disk
# mounted read-only.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write, from the exception or, as HDF5 reports it inside a
    library error's message (``errno = 28``), from its text; ``None`` for any other error."""
    number = getattr(exc, "errno", None)
    if number is None:
        found = re.search(r"errno = (\d+)", str(exc))
        number = int(found.group(1)) if found else None
    return number if number in _WRITE_ERRNOS else None


def write_failure(exc: BaseException, path: str | os.PathLike | None) -> OutputError | None:
    """A one-line error for a write that the disk refused, or ``None`` when ``exc`` is not one
    (a bad input read inside the block keeps its own error)."""
    number = write_errno(exc)
    if number is None:
        return None
    return OutputError(f"cannot write output: {os.strerror(number)} (nothing was written)", path)


def _refused(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """What to raise for ``exc``: an :class:`OutputError` naming ``path`` (caused by ``exc``)
    where it is a write the disk refused, else ``exc`` itself."""
    failure = write_failure(exc, path) if isinstance(exc, Exception) else None
    if failure is None:
        return exc
    failure.__cause__ = exc
    return failure


def _make_beside(folder: Path, name: str, made: list[Path], make) -> Path:
    """A temporary file or folder, made by ``make(path)`` (which must fail if the path
    exists), with a fresh hidden name beside ``name`` in ``folder``. Its name goes into
    ``made`` before it exists, so that a Ctrl-C or SIGTERM, whose exception can come between
    any two steps, never leaves one that the caller's cleanup of ``made`` does not know of
    (``tempfile.mkstemp`` names it only once it exists: a SIGTERM right then left it behind)."""
    while True:
        candidate = folder / f"{_temporary_prefix(name)}{secrets.token_hex(6)}.tmp"
        made.append(candidate)
        try:
            make(candidate)
            return candidate
        except FileExistsError:   # another's, not ours to remove: draw another name
            made.remove(candidate)


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in ``path``'s folder; on success move it onto ``path``. A write
    that the disk refuses (full, over quota, over the file-size limit) is an
    :class:`OutputError` naming ``path``."""
    path = check_writable(path)
    made: list[Path] = []
    try:
        try:
            tmp = str(_make_beside(path.parent, path.name, made, _new_file))
        except OSError as exc:
            raise DripError(f"cannot write output: {exc.strerror}", path) from exc
        yield tmp
        raise_if_signalled()   # a Ctrl-C or SIGTERM whose exception was lost on the way
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # made 0600, as mkstemp would; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        for tmp in made:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise _refused(exc, path)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, check=None):
    """An ``h5py.File`` opened for writing that becomes ``path`` only if the block succeeds
    and, where ``check`` is given, ``check(tmp)`` returns for the closed temporary file."""
    with atomic_path(path) as tmp:
        handle = _create_h5(tmp)
        try:
            yield handle
            handle.flush()  # a refused write fails here, before close starts taking it apart
            handle.close()
        except BaseException:
            _abandon(handle)
            raise
        if check is not None:
            check(tmp)


def _create_h5(tmp: str) -> h5py.File:
    """A new HDF5 file that defers no raw-data write to a dataset's close. HDF5 buffers small
    writes to a contiguous dataset (its sieve buffer, 64 KiB) until the dataset closes, which
    for a dataset h5py drops at once (``group[name] = array``) is the moment Python frees it:
    a write refused there (a full disk) is lost in a destructor, leaves the dataset half
    closed, and later crashes the interpreter. With no sieve buffer the write fails where it
    is made, as an error that reaches us. Chunked datasets keep their chunk cache: their
    objects stay referenced until the file is flushed."""
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_sieve_buf_size(0)
    return h5py.File(h5py.h5f.create(os.fsencode(tmp), h5py.h5f.ACC_TRUNC, fapl=access))


def _abandon(handle: h5py.File) -> None:
    """Close an unfinished ``handle`` whose file is about to be removed, without finishing it.
    HDF5 writes what it still buffers as a file closes. After a write was refused (a full
    disk), that write fails again, and a file left half-closed that way crashes the interpreter
    later (seen with h5py 3 on a full tmpfs). So the file's descriptor is pointed at
    ``/dev/null`` first, which takes any write."""
    if not handle.id.valid:
        return
    with contextlib.suppress(Exception):
        sink = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(sink, handle.id.get_vfd_handle())
        finally:
            os.close(sink)
    with contextlib.suppress(Exception):
        handle.close()


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield an empty staging folder beside ``folder``; on success move every file written
    there into ``folder`` (created, with its parents, if needed). So a set of files (a report)
    appears whole or not at all: after a failure ``folder`` is as it was, and no folder this
    call created is left."""
    folder = check_folder_writable(folder)
    parent = folder.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first
    made: list[Path] = []
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = _make_beside(parent, folder.name, made, lambda p: os.mkdir(p, 0o700))
        yield staging
        raise_if_signalled()
        folder.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, folder / item.name)
        staging.rmdir()
    except BaseException as exc:
        for staging in made:
            shutil.rmtree(staging, ignore_errors=True)
        for ancestor in created:
            with contextlib.suppress(OSError):
                ancestor.rmdir()
        raise _refused(exc, folder)


def json_text(value) -> str:
    """``value`` as indented, standard JSON (a NaN or infinite figure as ``null``)."""
    return json.dumps(_strict(value), indent=2, allow_nan=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_bytes(files: dict[str | os.PathLike, bytes]) -> None:
    """Write binary files atomically, as a set: each goes to a temporary file first, and only
    when all are written are they moved into place (renames, which a full disk cannot stop).
    Serialise to bytes first (``safetensors.torch.save``, ``torch.save`` into a buffer):
    Python's own write then reports a full disk as such, where those libraries' file writers
    raise errors of their own that hide the cause."""
    with contextlib.ExitStack() as stack:
        temporary = {path: stack.enter_context(atomic_path(path)) for path in files}
        for path, tmp in temporary.items():
            Path(tmp).write_bytes(files[path])


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to a file (a log such as ``history.csv``) whole or not at all: a
    refused write cuts the file back to where it ended."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        with open(path, "a", newline="") as handle:
            handle.write(text)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if size is None:
                os.remove(path)
            else:
                os.truncate(path, size)
        raise _refused(exc, path)


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
    """Write ``value`` as :func:`json_text` atomically."""
    write_text(path, json_text(value))
