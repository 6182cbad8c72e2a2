"""Operators given by a sparse matrix: the user's own (``matrix``) and, built from geometry,
the Radon transform (``tomography``, in :mod:`.tomography`).

The matrix acts on each channel's row-major flattened image. Products use torch's CSR kernels
(MKL on CPU, cuSPARSE on CUDA); the adjoint is the product with the explicitly stored transpose,
so ``<A x, y> = <x, A^T y>`` holds to rounding. Both directions go through one autograd function
whose backward is the other direction, so gradients (and gradients of gradients) flow through.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import LinearOperator


class _SparseProduct(torch.autograd.Function):
    """``matrix @ x`` for a CSR ``matrix`` and a dense ``x``; the backward asks ``transposed``
    (no arguments) for the transpose, so a product never differentiated never builds it."""

    @staticmethod
    def forward(ctx, x, matrix, transposed):
        ctx.matrices = (matrix, transposed)
        return matrix @ x

    @staticmethod
    def backward(ctx, grad):
        matrix, transposed = ctx.matrices
        return _SparseProduct.apply(grad.contiguous(), transposed(), lambda: matrix), None, None


def _csr_tensor(crow, col, values, size) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` of arrays known to be valid (no invariant check, no beta
    warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size=tuple(int(s) for s in size),
                                       check_invariants=False)


def _fits_32_bits(entries: int, shape) -> bool:
    """Whether a CSR matrix's row pointers and column indices fit 32-bit integers."""
    return max(entries, *(int(s) for s in shape)) < 2**31


def _csr(indptr, indices, data, shape) -> torch.Tensor:
    """A float64 CPU CSR tensor from arrays already checked by :func:`validate_csr`, with
    32-bit indices where they fit (as :func:`compact_csr`)."""
    index_dtype = np.int32 if _fits_32_bits(len(data), shape) else np.int64
    return _csr_tensor(torch.as_tensor(np.asarray(indptr, dtype=index_dtype)),
                       torch.as_tensor(np.asarray(indices, dtype=index_dtype)),
                       torch.as_tensor(np.asarray(data, dtype=np.float64)), shape)


def compact_csr(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix (CSR, or a coalesced COO) as CSR with 32-bit row pointers and column indices
    where they fit: half the index traffic of a product, which reads the whole matrix whatever
    the batch. The limited-angle Radon matrix (32 angles, 64x64, 282520 nonzeros, float32, 2
    threads): 0.15-0.30 ms against 0.29-0.41 for 1 to 16 images, 0.56-0.59 against 0.73-0.92
    for 64, the same results."""
    if matrix.layout != torch.sparse_csr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = matrix.to_sparse_csr()
    if not _fits_32_bits(matrix.values().numel(), matrix.shape):
        return matrix
    return _csr_tensor(matrix.crow_indices().to(torch.int32),
                       matrix.col_indices().to(torch.int32), matrix.values(), matrix.shape)


def transposed_csr(matrix: torch.Tensor) -> torch.Tensor:
    """The transpose of a CPU CSR matrix as CSR, with its index dtype: SciPy's CSR-to-CSC
    conversion, one counting pass over the entries that keeps each column's entries in row
    order. (``matrix.t().to_sparse_csr()`` took about 47 bytes per entry while it ran, 1.2 GB for
    the 26 million of 256 x 256 tomography at 180 angles; a stable ``np.argsort`` by column
    about 20 bytes, and 5.0 s for the 59 million of 384 x 384 images, where this takes 0.6-1.5
    s.)"""
    import scipy.sparse   # a dependency of scikit-image, imported only where a transpose is built

    rows, cols = matrix.shape
    crow, index = matrix.crow_indices().numpy(), matrix.col_indices().numpy()
    csc = scipy.sparse.csr_matrix((matrix.values().numpy(), index, crow), shape=(rows, cols),
                                  copy=False).tocsc()
    return _csr_tensor(torch.from_numpy(csc.indptr.astype(crow.dtype, copy=False)),
                       torch.from_numpy(csc.indices.astype(index.dtype, copy=False)),
                       torch.from_numpy(csc.data), (cols, rows))


def _csr_arrays(row, col, values, rows: int, index_dtype=np.int64):
    """CSR arrays ``(indptr, indices, data)`` of the entries ``(row[k], col[k], values[k])``
    (valid indices) of a matrix with ``rows`` rows: a stable sort by row, so the entries of
    each row keep their order."""
    order = np.argsort(row, kind="stable")
    indptr = np.zeros(rows + 1, dtype=index_dtype)
    np.cumsum(np.bincount(row, minlength=rows), out=indptr[1:])
    return indptr, col[order], values[order]


def validate_csr(indptr, indices, data, shape) -> None:
    """Raise ``ValueError`` unless the arrays form a valid CSR matrix with finite entries."""
    rows, cols = (int(s) for s in shape)
    if rows < 1:
        raise ValueError(f"matrix has shape {[rows, cols]}: it measures nothing")
    indptr, indices, data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
    if indptr.ndim != 1 or indices.ndim != 1 or data.ndim != 1:
        raise ValueError("CSR arrays data, indices and indptr must be 1-D")
    if not np.issubdtype(indptr.dtype, np.integer) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("CSR indices and indptr must be integers")
    if not np.issubdtype(data.dtype, np.floating) and not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"CSR data must be numeric, got {data.dtype}")
    if len(indptr) != rows + 1:
        raise ValueError(f"indptr has length {len(indptr)}, expected shape[0] + 1 = {rows + 1}")
    if indptr[0] != 0 or indptr[-1] != len(indices) or len(indices) != len(data):
        raise ValueError("CSR arrays are inconsistent (indptr[-1], len(indices), len(data))")
    if np.any(indptr[1:] < indptr[:-1]):   # not np.diff, which wraps around for unsigned
        raise ValueError("indptr is not non-decreasing")
    if len(indices) and (indices.min() < 0 or indices.max() >= cols):
        raise ValueError(f"column indices out of range [0, {cols})")
    if not np.all(np.isfinite(data)):
        raise ValueError("matrix entries contain NaN or Inf")
    if not np.any(data):
        raise ValueError(f"matrix has shape {[rows, cols]} but no nonzero entry: it measures nothing")


def canonical_csr(indptr, indices, data, shape):
    """Valid CSR arrays ``(indptr, indices, data)`` with each row's columns sorted and distinct,
    duplicates summed (SciPy's ``sum_duplicates``), as torch's CSR kernels assume; arrays that
    already are so are returned as they are. SciPy saves a COO matrix with its duplicates, and
    a CSR one with its columns in any order."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    increasing = indices[1:] > indices[:-1]   # not np.diff, which wraps around for unsigned
    starts = indptr[1:-1]   # a row's first entry need not follow the row before's last
    increasing[starts[(starts > 0) & (starts < len(indices))] - 1] = True
    if bool(increasing.all()):
        return indptr, indices, data
    import scipy.sparse

    matrix = scipy.sparse.csr_matrix((np.asarray(data), indices, indptr), shape=tuple(shape))
    matrix.sum_duplicates()
    return matrix.indptr, matrix.indices, matrix.data


def _checked_csr(indptr, indices, data, shape) -> torch.Tensor:
    """The float64 CPU CSR tensor of CSR arrays, once :func:`validate_csr` passes them, with
    each row's columns sorted and distinct (:func:`canonical_csr`)."""
    validate_csr(indptr, indices, data, shape)
    return _csr(*canonical_csr(indptr, indices, data, shape), shape)


class SparseMatrixOperator(LinearOperator):
    """``b_c = A x_c`` for each channel ``c``, with ``A`` an ``m x (H*W)`` matrix: a torch
    tensor (CSR, COO or dense), a SciPy sparse matrix of any format, or a NumPy array; stored
    as a float64 CSR tensor. SciPy's and NumPy's are checked as a file's are (finite entries,
    valid indices, some nonzero), ``ValueError`` otherwise."""

    kind = "matrix"

    def __init__(self, image_shape: tuple[int, int, int], matrix,
                 measurement_size: tuple[int, ...] | None = None):
        super().__init__(image_shape)
        if not isinstance(matrix, torch.Tensor):
            import scipy.sparse

            csr = scipy.sparse.csr_matrix(matrix)   # no copy of a SciPy CSR matrix
            matrix = _checked_csr(csr.indptr, csr.indices, csr.data, csr.shape)
        matrix = matrix.to(torch.float64)
        if matrix.layout != torch.sparse_csr:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                matrix = matrix.to_sparse_csr()
        pixels = self.image_shape[1] * self.image_shape[2]
        if matrix.shape[1] != pixels:
            raise ValueError(f"matrix has {matrix.shape[1]} columns, the image has {pixels} pixels")
        self.measurement_size = tuple(measurement_size or (matrix.shape[0],))
        if int(np.prod(self.measurement_size)) != matrix.shape[0]:
            raise ValueError("measurement size does not match the matrix rows")
        self._matrix = matrix
        self._cache: dict = {}   # the matrix and its transpose by dtype and device (matrix())

    @classmethod
    def from_csr(cls, image_shape, data, indices, indptr, shape) -> SparseMatrixOperator:
        return cls(image_shape, _checked_csr(indptr, indices, data, shape))

    @property
    def nnz(self) -> int:
        return int(self._matrix.values().numel())

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.measurement_size)

    def scipy_matrix(self) -> scipy.sparse.csr_matrix:
        """The matrix in float64 as a SciPy CSR matrix (sharing the stored arrays), for the
        linear algebra that torch's CSR tensors lack (products of two sparse matrices)."""
        import scipy.sparse
        return scipy.sparse.csr_matrix((self._matrix.values().numpy(),
                                        self._matrix.col_indices().numpy(),
                                        self._matrix.crow_indices().numpy()),
                                       shape=tuple(self._matrix.shape))

    def zero_rows(self) -> np.ndarray:
        """Which rows of the matrix hold no entry (measurements that see nothing of the image:
        a sinogram's detectors beyond the image's shadow), a boolean array."""
        return np.diff(self._matrix.crow_indices().numpy()) == 0

    def matrix(self, dtype: torch.dtype, device: torch.device,
               transpose: bool = False) -> torch.Tensor:
        """The CSR matrix, or its transpose, in ``dtype`` on ``device`` (converted once,
        cached), with 32-bit indices where they fit (:func:`compact_csr`).

        The transpose is built on first use, from the matrix in that dtype: ``drip simulate``
        only applies ``A``, and transposing costs about the matrix's memory again while it
        runs (tomography of 256 x 256 images at 180 angles, 26 million entries: building the
        operator peaked at 2.4 GB with a float64 transpose built at once, and ``simulate`` at
        1.2 GB without it). For another device the transpose is built on the CPU and moved;
        the CPU copy in ``dtype`` it is built from is not kept."""
        device, cpu = torch.device(device), torch.device("cpu")
        key = (transpose, dtype, device)
        if key not in self._cache:
            if transpose:   # built on the CPU, as the matrix was made there, then moved
                # the CPU matrix in this dtype is kept only where the products run on the CPU
                on_cpu = (self.matrix(dtype, cpu) if device == cpu
                          else compact_csr(self._matrix.to(dtype=dtype)))
                made = transposed_csr(on_cpu).to(device)
            else:
                made = self._matrix.to(device=device, dtype=dtype)
            self._cache[key] = compact_csr(made)
        return self._cache[key]

    @contextlib.contextmanager
    def conversions_dropped(self):
        """The matrices :meth:`matrix` converts within the block are dropped when it ends."""
        kept = set(self._cache)
        try:
            yield
        finally:
            for key in set(self._cache) - kept:
                del self._cache[key]

    def _product(self, t: torch.Tensor, transpose: bool,
                 inner: torch.Tensor | None = None) -> torch.Tensor:
        """``A x`` for images ``x = t``, or ``A^T y`` for measurements ``y = t`` (``transpose``),
        in the column layout of torch's CSR kernels. With ``inner``, a CSR matrix ``M`` on the
        flattened images (an embedding's ``E``, or ``E^T`` after the adjoint), ``A (M x)`` or
        ``M (A^T y)``: both products in one layout, so the batch is transposed once each way
        (:meth:`chained`); that form is not differentiable."""
        dtype, device = t.dtype, t.device
        matrix = self.matrix(dtype, device, transpose)
        columns = t.reshape(t.shape[0] * t.shape[1], -1).t().contiguous()
        if inner is None:
            out = _SparseProduct.apply(columns, matrix,
                                       lambda: self.matrix(dtype, device, not transpose))
        else:
            out = inner @ (matrix @ columns) if transpose else matrix @ (inner @ columns)
        shape = self.image_shape if transpose else self.measurement_shape
        return out.t().reshape(t.shape[0], *shape)

    def chained(self, t: torch.Tensor, inner: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``A (M x)`` or ``M (A^T y)`` for a CSR matrix ``M`` on the flattened images (see
        :meth:`_product`). Not differentiable; channels as for ``A``."""
        return self._product(t, transpose, inner)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, transpose=False)

    def _adjoint_impl(self, y: torch.Tensor) -> torch.Tensor:
        return self._product(y, transpose=True)

    def _write_hdf5(self, group) -> None:
        group.create_dataset("data", data=self._matrix.values().numpy())
        group.create_dataset("indices", data=self._matrix.col_indices().numpy())
        group.create_dataset("indptr", data=self._matrix.crow_indices().numpy())
        group.attrs["shape"] = np.asarray(self._matrix.shape, dtype=np.int64)

    @classmethod
    def _stored_measurement_size(cls, group, image_shape):
        return cls._stored_integers(group, "shape", 2)[:1]

    @classmethod
    def _read_hdf5(cls, group, image_shape):
        data, indices, indptr = (cls._stored_array(group, name)
                                 for name in ("data", "indices", "indptr"))
        return cls.from_csr(image_shape, data, indices, indptr,
                            cls._stored_integers(group, "shape", 2))

    def describe(self) -> dict:
        return {**super().describe(), "matrix_shape": list(self._matrix.shape), "nnz": self.nnz}


def _check_member_length(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse an array of an ``.npz`` archive whose header claims more bytes than the archive
    holds for it (a damaged file): NumPy allocates what the header claims before reading, so a
    cut archive claiming 40 billion entries ended as "out of memory"."""
    names = archive.namelist()   # NumPy's keys drop a member's .npy suffix where it has one
    info = archive.getinfo(f"{name}.npy" if f"{name}.npy" in names else name)
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)   # 3.0 differs in encoding only
        shape, _, dtype = read_header(handle)
    claimed = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and claimed > info.file_size:
        raise ValueError(f"the archive's array '{name}' is cut short: its header claims shape "
                         f"{shape} ({claimed} bytes) where the archive holds {info.file_size}")


def load_matrix_file(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Read a sparse matrix from a ``scipy.sparse.save_npz`` file, without pickle, as CSR
    arrays ``(data, indices, indptr, shape)``: a CSR matrix as it is, a CSC or COO one (as a
    matrix built by coordinates is saved) converted."""
    path = Path(path)
    if not path.exists():
        raise ValueError("no such file")
    if path.is_dir():
        raise ValueError("is a folder, expected an .npz archive")
    if not path.is_file():
        raise ValueError("is not a regular file (a device or a pipe)")
    if not zipfile.is_zipfile(path):   # np.load would read a .npy array or call it pickled data
        raise ValueError("not an .npz archive; save the matrix with scipy.sparse.save_npz")
    with np.load(path, allow_pickle=False) as archive:
        def npz(name: str) -> np.ndarray:
            # (``archive.files``: under NumPy 1.24 ``name in archive`` read the array, before
            # the checks below, as the Mapping's default)
            if name not in archive.files:
                raise ValueError(f"the archive has no array '{name}'; save the matrix with "
                                 "scipy.sparse.save_npz")
            try:
                _check_member_length(archive.zip, name)
                return archive[name]
            except (zlib.error, zipfile.BadZipFile, EOFError) as exc:
                # a damaged compressed archive ("unexpected error: Error -3 while
                # decompressing data" before)
                raise ValueError(f"the archive's array '{name}' is damaged ({exc})") from exc

        fmt = npz("format").item() if "format" in archive.files else b"csr"
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt not in ("csr", "csc", "coo"):
            raise ValueError(f"expected a CSR, CSC or COO matrix (scipy.sparse.save_npz), got "
                             f"{fmt}: save matrix.tocsr() instead")
        raw = npz("shape")
        whole = (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
                 and bool(np.all(np.isfinite(raw) & (raw == np.round(raw)))))
        if raw.ndim != 1 or len(raw) != 2 or not whole:
            raise ValueError(f"the matrix's shape must be two whole numbers, got {raw.tolist()!r}")
        shape = tuple(int(s) for s in raw)
        if fmt == "csr":
            return npz("data"), npz("indices"), npz("indptr"), shape
        if fmt == "coo":
            row, col, data = npz("row"), npz("col"), npz("data")
        else:   # CSC: the CSR arrays of the transpose (indices are rows, pointers columns)
            row, data, indptr = npz("indices"), npz("data"), npz("indptr")
            try:
                validate_csr(indptr, row, data, shape[::-1])
            except ValueError as exc:
                raise ValueError(f"CSC arrays, read as the CSR arrays of the transpose: {exc}") \
                    from exc
            col = np.repeat(np.arange(shape[1]), np.diff(indptr))
    rows, cols = shape
    for name, index, size in (("row", row, rows), ("column", col, cols)):
        if index.ndim != 1 or len(index) != len(data) or data.ndim != 1:
            raise ValueError(f"{fmt.upper()} arrays of {name} indices and data must be 1-D and "
                             "of one length")
        if not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"{fmt.upper()} {name} indices must be integers")
        if len(index) and (index.min() < 0 or index.max() >= size):
            raise ValueError(f"{name} indices out of range [0, {size})")
    indptr, indices, data = _csr_arrays(row, col, data, max(rows, 0))
    return data, indices, indptr, shape

