"""Linear forward operators ``A`` with exact adjoints.

Every operator maps a batch of images ``x`` shaped ``(N, C, H, W)`` to measurements shaped
``(N, C, *S)`` and back with its adjoint, channel by channel. Operators are ``torch.nn.Module``
objects without trainable parameters: they follow the input's dtype and device (float32 or
float64, CPU or CUDA), and they are differentiable, so a solver can be unrolled through them.

An operator is stored in, and rebuilt from, the ``operator`` group of an HDF5 file
(see CONTRACT.md); :func:`drip_cli.operators.operator_from_hdf5` dispatches on ``kind``.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import h5py
import numpy as np
import torch

from ..batching import batch_dot


def _shown_briefly(value, limit: int = 40) -> str:
    """An attribute's value as an error message shows it: text quoted, cut to ``limit``."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    shown = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


class LinearOperator(torch.nn.Module):
    """Base class: ``forward`` is ``A``, ``adjoint`` is ``A^T``.

    Subclasses set ``kind`` and implement ``_forward_impl``, ``_adjoint_impl``, ``measurement_shape``,
    ``_write_hdf5`` and ``_read_hdf5``.
    """

    kind: ClassVar[str] = ""
    # shift-invariant with a periodic boundary, per channel (a circulant convolution: blur, the
    # identity), so diagonal in the Fourier basis: with a periodic embedding the DRIP
    # projections are solved there exactly (drip_cli.solvers.projection)
    periodic: ClassVar[bool] = False

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        channels, height, width = (int(v) for v in image_shape)
        if min(channels, height, width) < 1:
            raise ValueError(f"image_shape must be positive, got {image_shape}")
        self.image_shape = (channels, height, width)

    # -- shapes --------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def scored(self) -> tuple[slice, slice]:
        """The rows and columns of the image that quality is measured on (PSNR and SSIM, and
        training's losses): all of them, but where the operator sees a margin of the image
        only in part (the valid blur), the pixels at the measured positions."""
        return slice(None), slice(None)

    def scored_part(self, images):
        """The :attr:`scored` pixels of ``images`` (``(..., H, W)``, an array or a tensor)."""
        return images[(..., *self.scored)]

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        """Shape of one sample's measurements, ``(C, *S)``."""
        raise NotImplementedError

    @property
    def measured_count(self) -> int:
        """``M``: the number of measured entries of one sample (used by the discrepancy ratio)."""
        return math.prod(self.measurement_shape)

    def _check(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(t.shape[1:]) != tuple(shape):
            raise ValueError(
                f"{self.kind} operator expects {what} of shape (N, {', '.join(map(str, shape))}), "
                f"got {tuple(t.shape)}"
            )

    @contextlib.contextmanager
    def conversions_dropped(self):
        """Within the block, copies of the operator's data made for another dtype or device
        are dropped when it ends (a sparse matrix's float64 copy and transpose,
        :class:`~drip_cli.operators.sparse.SparseMatrixOperator`); operators that keep none do
        nothing."""
        yield

    # -- application ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(N, C, H, W)``."""
        self._check(x, self.image_shape, "images")
        if len(x) == 0:   # an empty batch (a solve whose samples all finished): no kernel call
            return x.new_zeros(0, *self.measurement_shape)
        return self._forward_impl(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for ``y`` of shape ``(N, C, *S)``."""
        self._check(y, self.measurement_shape, "measurements")
        if len(y) == 0:
            return y.new_zeros(0, *self.image_shape)
        return self._adjoint_impl(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T A x``."""
        return self.adjoint(self.forward(x))

    def project_measurements(self, b: torch.Tensor) -> torch.Tensor:
        """Zero the entries of ``b`` that are not data (only inpainting has such entries)."""
        return b

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint_impl(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- persistence ---------------------------------------------------------------------------
    def to_hdf5(self, group) -> None:
        """Write the operator to an (empty) h5py group, as CONTRACT.md specifies."""
        group.attrs["kind"] = self.kind
        group.attrs["image_shape"] = np.asarray(self.image_shape, dtype=np.int64)
        self._write_hdf5(group)

    def _write_hdf5(self, group) -> None:
        pass

    @classmethod
    def _read_hdf5(cls, group, image_shape: tuple[int, int, int]) -> LinearOperator:
        return cls(image_shape)

    @classmethod
    def _stored_measurement_size(cls, group, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        """The per-channel measurement shape ``S`` of the operator stored in ``group``, from its
        attributes and small datasets, without building it."""
        return tuple(image_shape[1:])

    @staticmethod
    def _stored_integers(group, name: str, length: int) -> tuple[int, ...]:
        """The ``length`` whole numbers in the operator group's attribute ``name``; a missing
        attribute, or one that is not ``length`` finite whole numbers (text, NaN, Inf, 2.5), is a
        ``ValueError`` that names it."""
        if name not in group.attrs:
            raise ValueError(f"operator group lacks attribute '{name}'")
        values = np.asarray(group.attrs[name]).ravel()
        if (len(values) != length or values.dtype.kind not in "iuf"
                or not np.all(np.isfinite(values)) or np.any(values != np.round(values))
                or np.any(np.abs(values) >= 2**62)):
            shown = (values.tolist() if values.dtype.kind in "iufb"
                     else _shown_briefly(group.attrs[name]))
            raise ValueError(f"operator attribute '{name}' must be {length} whole number"
                             f"{'s' if length > 1 else ''}, got {shown}")
        return tuple(int(v) for v in values)

    @staticmethod
    def _stored_array(group, name: str) -> np.ndarray:
        """The array of real numbers (or booleans) in the operator group's dataset ``name``; a
        missing one (or a group of that name) or one of another dtype is a ``ValueError`` that
        names it (complex angles or PSFs were cast to their real part with NumPy's warning,
        strings read as the numbers they spell)."""
        if not isinstance(group.get(name), h5py.Dataset):
            raise ValueError(f"operator group lacks dataset '{name}'")
        dataset = group[name]
        if dataset.dtype.kind not in "biuf":
            raise ValueError(f"operator dataset '{name}' has dtype {dataset.dtype}, expected "
                             "real numbers")
        return dataset[()]

    def describe(self) -> dict:
        """Human-readable parameters, for ``drip info`` and reports."""
        return {"kind": self.kind, "image_shape": list(self.image_shape),
                "measurement_shape": list(self.measurement_shape)}

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, measurement_shape={self.measurement_shape}"


@torch.no_grad()
def estimate_norm(
    op: LinearOperator,
    iterations: int = 50,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    keep_conversions: bool = False,
) -> float:
    """Spectral norm ``||A||`` by power iteration on ``A^T A`` (a lower bound that converges).

    The copies of the operator's data made for ``dtype`` are dropped afterwards unless
    ``keep_conversions`` (:meth:`LinearOperator.conversions_dropped`): a float64 estimate for a
    float32 solve kept a float64 copy of a sparse matrix and its transpose beside the float32
    ones for the whole solve (``drip reconstruct --method tv`` on 256x256 tomography at 180
    angles peaked at 1.72 GB, CGLS at 1.40)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((1, *op.image_shape), generator=gen, dtype=dtype).to(device)
    x /= x.norm()
    value = 0.0
    with contextlib.nullcontext() if keep_conversions else op.conversions_dropped():
        for _ in range(iterations):
            y = op.normal(x)
            value = float(y.norm())
            if value == 0.0:
                return 0.0
            x = y / value
    return math.sqrt(value)


# Lanczos from a random start: its largest Ritz value after k steps on an n-dimensional positive
# semidefinite operator is below (1 - slack) lambda_max with probability at most
# 1.648 sqrt(n) exp(-sqrt(slack) (2k - 1)) (Kuczynski & Wozniakowski, SIAM J. Matrix Anal. Appl.
# 13, 1992); largest_eigenvalue_bound takes enough steps to keep that below LANCZOS_FAILURE.
LANCZOS_SLACK = 0.02
LANCZOS_FAILURE = 1e-6


def lanczos_steps(n: int, slack: float = LANCZOS_SLACK, failure: float = LANCZOS_FAILURE) -> int:
    """The Lanczos steps after which ``lambda / (1 - slack)`` bounds ``lambda_max`` except with
    probability ``failure`` (see ``LANCZOS_SLACK``); one more than the theorem's count."""
    return math.ceil((math.log(1.648 * math.sqrt(n) / failure) / math.sqrt(slack) + 1) / 2) + 1


@torch.no_grad()
def largest_eigenvalue_bound(apply, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
                             device: torch.device | str = "cpu", seed: int = 0,
                             slack: float = LANCZOS_SLACK,
                             failure: float = LANCZOS_FAILURE) -> float:
    """An upper bound on the largest eigenvalue of the symmetric positive semidefinite operator
    ``apply`` on tensors of ``shape`` that holds except with probability ``failure`` over the
    random start: Lanczos's largest Ritz value divided by ``1 - slack`` (see ``LANCZOS_SLACK``).
    The start comes from a generator seeded with ``seed``, independent of the operator, so the
    figure is reproducible. The plain three-term recurrence keeps two vectors: in floating point
    its Ritz values stay inside the spectrum up to rounding, which the slack covers."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    q_prev, beta, largest = torch.zeros_like(q), 0.0, 0.0
    alphas, betas = [], []
    for _ in range(lanczos_steps(q.numel(), slack, failure)):
        w = apply(q)
        alpha = float((q * w).sum())
        w = w - alpha * q - beta * q_prev
        alphas.append(alpha)
        largest = max(largest, abs(alpha))
        beta = float(w.norm())
        if beta <= 1e-12 * largest:   # an invariant subspace: exact
            break
        betas.append(beta)
        q_prev, q = q, w / beta
    off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
    tridiagonal = (torch.diag(torch.tensor(alphas, dtype=torch.float64))
                   + torch.diag(off, 1) + torch.diag(off, -1))
    return float(torch.linalg.eigvalsh(tridiagonal).max()) / (1 - slack)


def norm_bound(op: LinearOperator, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu", seed: int = 0) -> float:
    """An upper bound on ``||A||`` (:func:`largest_eigenvalue_bound` of ``A^T A``), what a
    step size must come from; :func:`estimate_norm`'s power iteration is a lower bound. On the
    sample files it is 1.010 times the converged norm. The copies of the operator's data
    made for ``dtype`` are dropped afterwards."""
    with op.conversions_dropped():
        return math.sqrt(largest_eigenvalue_bound(op.normal, (1, *op.image_shape), dtype=dtype,
                                                  device=device, seed=seed))


@torch.no_grad()
def adjointness_error(
    op: LinearOperator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    trials: int = 3,
    seed: int = 0,
    norm: float | None = None,
) -> float:
    """Largest ``|<A x, y> - <x, A^T y>| / (||A|| ||x|| ||y||)`` over random ``x``, ``y``.

    Normalising by ``||A||`` (as ODL does) makes the figure independent of the operator's scale
    and meaningful for operators with a large null space.
    """
    if norm is None:
        norm = estimate_norm(op, dtype=torch.float64, device=device, keep_conversions=True)
    if norm == 0.0:
        return 0.0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((trials, *op.image_shape), generator=gen, dtype=torch.float64)
    y = torch.randn((trials, *op.measurement_shape), generator=gen, dtype=torch.float64)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    y = op.project_measurements(y)
    lhs = batch_dot(op(x), y).double()
    rhs = batch_dot(x, op.adjoint(y)).double()
    scale = norm * x.double().flatten(1).norm(dim=1) * y.double().flatten(1).norm(dim=1)
    return float(((lhs - rhs).abs() / scale).max())
