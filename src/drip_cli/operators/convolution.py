"""The adjoint of a stride-1 ``conv2d``, by whichever CPU kernel is faster for its shape (and
single-channel convolutions as depthwise ones over the batch, :func:`conv2d`).

Both ``conv_transpose2d`` and a ``conv2d`` with the flipped, channel-transposed kernel compute
it, but which of PyTorch's CPU kernels is faster depends on the shape *and on the processor*
(float32, 2 threads, 64 images of 64x64). Summing 8 filter responses into one channel (a 5x5
filter bank's ``K^T``): on one machine ``conv_transpose2d`` took 9.6 ms against 30 ms (dilation
1) and 38 ms (dilation 2); on another (AVX-512 with AMX) 12.6 and 13.8 ms against 5.7 and 5.6
ms. Mapping 1 or 2 channels to one (the embedding's 3x3 kernel), ``conv2d`` took 1.0 ms against
3.7 ms on the first. A fixed rule chose wrong on the second machine, where DRIP fell behind TV in
``make bench`` (12.2 s against 11.6). So on the CPU each kind of adjoint (kernel shape, channels,
image size, dtype, padding, dilation) times both kernels once per process, on its first input,
and keeps the faster; on other devices ``conv_transpose2d`` sums 4 or more channels. Both give
the same result up to float rounding; the choice is fixed within a process, and a training
checkpoint carries the choices made so far (:func:`cpu_kernel_choices`), which a run resumed in
a new process (``drip train --resume``) adopts (:func:`adopt_cpu_kernel_choices`) instead of
timing afresh: timing could choose the other kernel, and the resumed run would then differ from
the uninterrupted one in the last bits.

The learned convolutions (the regularizer's filter bank, the embedding ``E``) extend the image
by half-sample symmetric padding, :func:`symmetric_pad`, whose adjoint folds the mirrored samples
back (:func:`symmetric_pad_adjoint`). A constant image then stays constant up to the border: zero
padding pulled border pixels towards 0 (0.6 dB of PSNR on 64x64 blur in the filter bank; in
``E``, whose trained weights do not sum to 1, a dark or bright frame one pixel wide).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

# on devices other than the CPU: from this many channels summed, conv_transpose2d
TRANSPOSE_FROM_CHANNELS = 4
TIMING_REPEATS = 3
_cpu_choice: dict[tuple, bool] = {}   # kind of adjoint -> conv_transpose2d is the faster kernel


def _flipped_conv2d(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """Correlation with the flipped, channel-transposed kernel at the same dilation."""
    flipped = weight.flip(-1, -2).transpose(0, 1)
    return F.conv2d(y, flipped, padding=dilation * (weight.shape[-1] - 1) - padding,
                    dilation=dilation)


def _fastest_seconds(run) -> float:
    run()   # the first call may allocate or pick an algorithm
    best = math.inf
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _transpose_is_faster(y: torch.Tensor, weight: torch.Tensor, padding: int,
                         dilation: int) -> bool:
    if y.device.type != "cpu":
        return weight.shape[0] >= TRANSPOSE_FROM_CHANNELS
    key = (tuple(weight.shape), tuple(y.shape[1:]), y.dtype, padding, dilation)
    if key not in _cpu_choice:
        with torch.no_grad():
            y, weight = y.detach(), weight.detach()
            transpose = _fastest_seconds(
                lambda: F.conv_transpose2d(y, weight, padding=padding, dilation=dilation))
            flipped = _fastest_seconds(lambda: _flipped_conv2d(y, weight, padding, dilation))
        _cpu_choice[key] = transpose < flipped
    return _cpu_choice[key]


def cpu_kernel_choices() -> list[list]:
    """The CPU kernel choices made so far, as rows ``[weight shape, input shape without the
    batch, dtype name, padding, dilation, conv_transpose2d chosen]`` of plain lists, numbers,
    strings and booleans (so a checkpoint loads them with ``weights_only=True``)."""
    return [[list(w), list(y), str(dtype).removeprefix("torch."), padding, dilation, choice]
            for (w, y, dtype, padding, dilation), choice in _cpu_choice.items()]


def adopt_cpu_kernel_choices(rows) -> None:
    """Make the choices of :func:`cpu_kernel_choices` (from another process) this process's
    own. Raises ``ValueError`` on rows that are not such choices."""
    adopted = {}
    for row in rows:
        try:
            w, y, dtype_name, padding, dilation, choice = row
            dtype = getattr(torch, dtype_name)
            # type(v) is int: a bool is an int to isinstance, and no shape is True
            if not (isinstance(dtype, torch.dtype) and isinstance(choice, bool)
                    and all(type(v) is int for v in (*w, *y, padding, dilation))):
                raise TypeError
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"not a kernel choice: {row!r}") from None
        adopted[(tuple(w), tuple(y), dtype, padding, dilation)] = choice
    _cpu_choice.update(adopted)


def _single_channel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One input and one output channel, a non-empty batch, on the CPU."""
    return x.device.type == "cpu" and weight.shape[0] == weight.shape[1] == 1 and len(x) > 0


def _batch_as_channels(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """``F.conv2d`` with one input and one output channel as a depthwise convolution over the
    batch: the same convolution, and on the CPU about twice as fast (see :func:`conv2d`)."""
    n = x.shape[0]
    out = F.conv2d(x.reshape(1, n, *x.shape[2:]), weight.expand(n, 1, -1, -1), padding=padding,
                   dilation=dilation, groups=n)
    return out.view(n, 1, *out.shape[2:])


def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int = 0,
           dilation: int = 1) -> torch.Tensor:
    """``F.conv2d`` (stride 1). A single-channel convolution on the CPU runs as a depthwise
    convolution with the batch as its channels, the same convolution (on this machine the
    same numbers to the last bit): for the embedding's 3x3 kernel on 64 images of 64x64
    (float32, 2 threads) 0.69 ms against 1.44, and its adjoint 0.53 ms against 1.34; the
    tomography sample model's reconstruction of 64 crops took 11-14% less time, with the same
    iterates. Other devices and channel counts keep ``F.conv2d`` (unmeasured there; with 2 or
    3 channels the depthwise form was slower)."""
    if _single_channel(x, weight):
        return _batch_as_channels(x, weight, padding, dilation)
    return F.conv2d(x, weight, padding=padding, dilation=dilation)


def conv2d_adjoint(y: torch.Tensor, weight: torch.Tensor, padding: int = 0,
                   dilation: int = 1) -> torch.Tensor:
    """Adjoint of ``F.conv2d(x, weight, padding=padding, dilation=dilation)`` (stride 1, odd
    square kernels), by the faster kernel (see the module docstring; single channels as in
    :func:`conv2d`)."""
    if _single_channel(y, weight):
        return _batch_as_channels(y, weight.flip(-1, -2),
                                  dilation * (weight.shape[-1] - 1) - padding, dilation)
    if _transpose_is_faster(y, weight, padding, dilation):
        return F.conv_transpose2d(y, weight, padding=padding, dilation=dilation)
    return _flipped_conv2d(y, weight, padding, dilation)


def _mirror_axis(z: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Extend axis ``dim`` by ``pad`` mirrored samples on each side, edge sample repeated
    (``[1 0 | 0 1 ... n-1 | n-1 n-2]``): the even, half-sample extension."""
    n = z.shape[dim]
    return torch.cat([z.narrow(dim, 0, pad).flip(dim), z, z.narrow(dim, n - pad, pad).flip(dim)], dim)


def _fold_axis(g: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """The adjoint of :func:`_mirror_axis`: the mirrored samples are added back to their sources."""
    n = g.shape[dim] - 2 * pad
    inner = g.narrow(dim, pad, n).clone()
    inner.narrow(dim, 0, pad).add_(g.narrow(dim, 0, pad).flip(dim))
    inner.narrow(dim, n - pad, pad).add_(g.narrow(dim, n + pad, pad).flip(dim))
    return inner


def symmetric_pad(z: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-sample symmetric padding of the last two axes (needs ``pad <= H, W``). Slices and
    flips, not ``index_select``: 4-5x faster on 64 images of 64x64 (0.25-0.35 ms against 1.2)."""
    if pad == 0:
        return z
    return _mirror_axis(_mirror_axis(z, pad, -2), pad, -1)


def symmetric_pad_adjoint(g: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`symmetric_pad`: mirrored samples are added back where they came from."""
    if pad == 0:
        return g
    return _fold_axis(_fold_axis(g, pad, -2), pad, -1)
