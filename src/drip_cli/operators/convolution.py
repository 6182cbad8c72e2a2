"""The adjoint of a stride-1 ``conv2d``, by whichever CPU kernel is faster for its shape (and
single-channel convolutions as depthwise ones over the batch, :func:`conv2d`); and the
half-sample symmetric padding of the learned convolutions.

Both ``conv_transpose2d`` and a ``conv2d`` with the flipped, channel-transposed kernel compute
the adjoint, but which of PyTorch's CPU kernels is faster depends on the shape *and on the
processor*, by factors of 2-4 either way (a fixed rule once put DRIP behind TV in ``make bench``
on another machine). So on the CPU each kind of adjoint (kernel shape, channels, image size,
dtype, padding, dilation) times the kernels once per process, on its first input (32 samples of
it, or as many of ones where it has fewer), and keeps the faster; on other devices
``conv_transpose2d`` sums 4 or more channels. Where the convolution has one input channel (a
grayscale latent's filter bank), a third kernel competes: a depthwise convolution over batch x
filters, summed over the filters (:func:`_batch_as_channels`). All give the same result up to
float rounding; the choice is fixed within a process, and a training checkpoint carries the
choices made so far (:func:`cpu_kernel_choices`), which a run resumed in a new process (``drip
train --resume``) adopts (:func:`adopt_cpu_kernel_choices`) instead of timing afresh: timing
could choose the other kernel, and the resumed run would then differ from the uninterrupted one
in the last bits. The timings are in ``docs/design.md``.

The learned convolutions (the regularizer's filter bank, the embedding ``E``) extend the image
by half-sample symmetric padding, :func:`symmetric_pad`, whose adjoint folds the mirrored samples
back (:func:`symmetric_pad_adjoint`). A constant image then stays constant up to the border: zero
padding pulled border pixels towards 0 (0.6 dB of PSNR on 64x64 blur in the filter bank; in
``E``, whose trained weights do not sum to 1, a dark or bright frame one pixel wide). An
embedding may instead extend it periodically (:func:`periodic_pad`), as a periodic operator
does, so that ``A E`` is diagonal in the Fourier basis (:mod:`drip_cli.regularizers.embedding`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

# on devices other than the CPU: from this many channels summed, conv_transpose2d
TRANSPOSE_FROM_CHANNELS = 4
TIMING_REPEATS = 5
# the kernels are timed on this many samples, the size of the regularizer's chunks: the
# depthwise kernel's lead grows with the batch (the tomography model's K^T: 0.8-1.0 ms
# against 1.07 for 8 samples, 3.4-4.9 against 5.9-6.2 for 32), and timed on the first call's
# 1, 2 or 8 samples it lost to the flipped conv2d in 1-2 of 3 processes (fewer where 32 would
# take more than TIMING_BYTES)
TIMING_BATCH, TIMING_BYTES = 32, 8 * 2**20
# device types on which a convolution's batch is padded to a power of two (_batch_padded)
PAD_BATCH_ON = {"cuda"}
# on the CPU, a single-channel convolution over planes of more than TILE_FROM_PIXELS pixels
# runs as a batch of tiles of side TILE (and the kernel's reach more): see _tiled
TILE, TILE_FROM_PIXELS = 128, 256 * 256
_cpu_choice: dict[tuple, str] = {}   # kind of adjoint -> the faster kernel's name


def _as_correlation(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int, run):
    """The adjoint of ``F.conv2d(x, weight, padding, dilation)`` as ``run(y, flipped, padding,
    dilation)``: a convolution with the flipped, channel-transposed kernel at the same
    dilation, padded by the kernel's reach less the forward padding."""
    return run(y, weight.flip(-1, -2).transpose(0, 1), dilation * (weight.shape[-1] - 1) - padding,
               dilation)


def _flipped_conv2d(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """Correlation with the flipped, channel-transposed kernel at the same dilation."""
    return _as_correlation(y, weight, padding, dilation,
                           lambda y, w, p, d: F.conv2d(y, w, padding=p, dilation=d))


def _fastest(runs: dict) -> str:
    """The name of the fastest of ``runs`` (name -> callable): each is called once to warm up,
    then all are timed in turns, the best of ``TIMING_REPEATS`` turns each, so that a slow
    spell of the machine or a first-call cost falls on every candidate alike."""
    for run in runs.values():   # the first call may allocate or pick an algorithm
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(TIMING_REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


ADJOINT_KERNELS = ("transpose", "flipped", "depthwise")


def _adjoint_kernel(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int) -> str:
    """Which kernel computes this adjoint: ``"transpose"`` (``conv_transpose2d``),
    ``"flipped"`` (:func:`_flipped_conv2d`) or, for one output channel, ``"depthwise"``
    (:func:`_batch_as_channels`); on the CPU the fastest of them, timed once per kind."""
    if y.device.type != "cpu":
        return "transpose" if weight.shape[0] >= TRANSPOSE_FROM_CHANNELS else "flipped"
    key = (tuple(weight.shape), tuple(y.shape[1:]), y.dtype, padding, dilation)
    if key not in _cpu_choice:
        candidates = ADJOINT_KERNELS if weight.shape[1] == 1 else ADJOINT_KERNELS[:2]
        with torch.no_grad():
            per_sample = math.prod(y.shape[1:]) * y.element_size()
            n = max(1, min(TIMING_BATCH, TIMING_BYTES // per_sample))
            y = y.detach()[:n] if len(y) >= n else y.new_ones(n, *y.shape[1:])
            weight = weight.detach()
            _cpu_choice[key] = _fastest({
                name: (lambda kernel=_ADJOINTS[name]: kernel(y, weight, padding, dilation))
                for name in candidates})
    return _cpu_choice[key]


def cpu_kernel_choices() -> list[list]:
    """The CPU kernel choices made so far, as rows ``[weight shape, input shape without the
    batch, dtype name, padding, dilation, kernel name]`` of plain lists, numbers and strings
    (so a checkpoint loads them with ``weights_only=True``)."""
    return [[list(w), list(y), str(dtype).removeprefix("torch."), padding, dilation, choice]
            for (w, y, dtype, padding, dilation), choice in _cpu_choice.items()]


def adopt_cpu_kernel_choices(rows) -> None:
    """Make the choices of :func:`cpu_kernel_choices` (from another process) this process's
    own. A boolean choice, as checkpoints before the depthwise kernel stored it, means
    ``conv_transpose2d`` (True) or the flipped ``conv2d``. Raises ``ValueError`` on rows that
    are not such choices."""
    adopted = {}
    for row in rows:
        try:
            w, y, dtype_name, padding, dilation, choice = row
            dtype = getattr(torch, dtype_name)
            if isinstance(choice, bool):
                choice = "transpose" if choice else "flipped"
            # type(v) is int: a bool is an int to isinstance, and no shape is True
            if not (isinstance(dtype, torch.dtype) and choice in ADJOINT_KERNELS
                    and all(type(v) is int for v in (*w, *y, padding, dilation))):
                raise TypeError
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"not a kernel choice: {row!r}") from None
        adopted[(tuple(w), tuple(y), dtype, padding, dilation)] = choice
    _cpu_choice.update(adopted)


def _single_channel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One input and one output channel, on the CPU."""
    return x.device.type == "cpu" and weight.shape[0] == weight.shape[1] == 1


def _batch_as_channels(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """``F.conv2d`` with one output channel as a depthwise convolution over batch x input
    channels (each channel with its own kernel, ``weight`` of shape ``(1, C, k, k)``), summed
    over the channels: the same convolution, and on the CPU often faster (see :func:`conv2d`
    and the module docstring)."""
    n, c = x.shape[:2]
    if n == 0:   # no channels to group: the ordinary convolution, for its output's shape
        return F.conv2d(x, weight, padding=padding, dilation=dilation)
    kernels = weight.expand(n, c, -1, -1).reshape(n * c, 1, *weight.shape[2:])
    if dilation > 1 and padding:
        # padded beforehand: PyTorch's CPU kernel for a dilated depthwise convolution with
        # padding was 10x slower (8 filters at dilation 2, padding 8: 47 ms against 4.8 on 64
        # images); padded before the reshape, a slice of channels is copied once, not twice
        x, padding = F.pad(x, (padding,) * 4), 0
    # undilated, the kernel pads faster than F.pad, which fills and copies (32 images, 8
    # filters of 5x5, padding 4: 1.2-1.5 ms against 1.9-2.3; the embedding's 3x3 adjoint, 64
    # images: 0.38 against 0.53)
    x = x.reshape(1, n * c, *x.shape[2:])
    out = F.conv2d(x, kernels, padding=padding, dilation=dilation, groups=n * c)
    out = out.view(n, c, *out.shape[2:])
    return out if c == 1 else out.sum(1, keepdim=True)


def _depthwise_adjoint(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """The adjoint of a convolution with one input channel (``weight`` ``(F, 1, k, k)``): each
    response correlated with its flipped filter, :func:`_batch_as_channels`."""
    return _as_correlation(y, weight, padding, dilation, _batch_as_channels)


def _transposed(y: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    return F.conv_transpose2d(y, weight, padding=padding, dilation=dilation)


_ADJOINTS = {"transpose": _transposed, "flipped": _flipped_conv2d, "depthwise": _depthwise_adjoint}


def _tiles(x: torch.Tensor, halo: int):
    """``x`` ``(N, C, H, W)`` as a batch of overlapping windows of side ``TILE + halo`` at
    stride ``TILE``, zero-extended at the bottom and right to fill the last ones: ``(windows,
    rows, columns)``, the windows ``(N * rows * columns, C, TILE + halo, TILE + halo)``."""
    n, c, h, w = x.shape
    rows, columns = -(-(h - halo) // TILE), -(-(w - halo) // TILE)
    x = F.pad(x, (0, columns * TILE + halo - w, 0, rows * TILE + halo - h))
    windows = x.unfold(2, TILE + halo, TILE).unfold(3, TILE + halo, TILE)
    side = TILE + halo
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, side, side), rows, columns


def _untiled(tiles: torch.Tensor, n: int, rows: int, columns: int, height: int,
             width: int) -> torch.Tensor:
    """The inverse of :func:`_tiles` for results of side ``TILE`` each, cut to ``height x
    width``."""
    f = tiles.shape[1]
    out = tiles.reshape(n, rows, columns, f, TILE, TILE).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n, f, rows * TILE, columns * TILE)[:, :, :height, :width].contiguous()


def _tiled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A single-channel convolution (the embedding's) on the CPU over planes of more than
    ``TILE_FROM_PIXELS``, which runs faster as a batch of tiles: PyTorch's CPU kernel for one
    large plane is slower per pixel by a factor of 6 from about 750x750 (the embedding's 3x3
    kernel, float32, 2 threads: 1.8 ms at 724x724, 12.3 at 760x760, 22.8 at 1024x1024),
    where tiles of 128x128 take 1.3 ms for 1024x1024; at 512x512 0.37 against 1.2 ms."""
    return (_single_channel(x, weight) and len(x) > 0
            and x.shape[-2] * x.shape[-1] > TILE_FROM_PIXELS)


def _tiled_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int):
    """:func:`conv2d` as a batch of tiles: each output tile from its input window, the
    kernel's reach ``e`` wider (the same sums)."""
    reach = dilation * (weight.shape[-1] - 1)
    if padding:
        x = F.pad(x, (padding,) * 4)
    tiles, rows, columns = _tiles(x, reach)
    out = _conv2d(tiles, weight, 0, dilation)
    return _untiled(out, len(x), rows, columns, x.shape[-2] - reach, x.shape[-1] - reach)


def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int = 0,
           dilation: int = 1) -> torch.Tensor:
    """``F.conv2d`` (stride 1): a large single-channel image on the CPU as a batch of tiles
    (:func:`_tiled`), the rest by :func:`_conv2d`."""
    if _tiled(x, weight):
        return _tiled_conv2d(x, weight, padding, dilation)
    return _conv2d(x, weight, padding, dilation)


def conv2d_adjoint(y: torch.Tensor, weight: torch.Tensor, padding: int = 0,
                   dilation: int = 1) -> torch.Tensor:
    """Adjoint of ``F.conv2d(x, weight, padding=padding, dilation=dilation)`` (stride 1, odd
    square kernels): a large single-channel image on the CPU as a batch of tiles
    (:func:`_tiled`), the rest by :func:`_adjoint`."""
    if _tiled(y, weight):
        return _as_correlation(y, weight, padding, dilation, _tiled_conv2d)
    return _adjoint(y, weight, padding, dilation)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int = 0,
            dilation: int = 1) -> torch.Tensor:
    """``F.conv2d`` (stride 1). A single-channel convolution on the CPU runs as a depthwise
    convolution with the batch as its channels, the same convolution (on this machine the
    same numbers to the last bit): for the embedding's 3x3 kernel on 64 images of 64x64
    (float32, 2 threads) 0.69 ms against 1.44, and its adjoint 0.53 ms against 1.34; the
    tomography sample model's reconstruction of 64 crops took 11-14% less time, with the same
    iterates. Other devices and channel counts keep ``F.conv2d`` (unmeasured there; with 2 or
    3 channels the depthwise form was slower, and so was a filter bank's forward, 1 to 8
    channels: 3.3-3.5 ms against 1.9)."""
    if _single_channel(x, weight):
        return _batch_as_channels(x, weight, padding, dilation)
    return _batch_padded(F.conv2d, x, weight, padding=padding, dilation=dilation)


def _adjoint(y: torch.Tensor, weight: torch.Tensor, padding: int = 0,
             dilation: int = 1) -> torch.Tensor:
    """Adjoint of ``F.conv2d(x, weight, padding=padding, dilation=dilation)`` (stride 1, odd
    square kernels), by the faster kernel (see the module docstring; single channels as in
    :func:`conv2d`)."""
    if _single_channel(y, weight):
        return _depthwise_adjoint(y, weight, padding, dilation)
    return _batch_padded(_ADJOINTS[_adjoint_kernel(y, weight, padding, dilation)], y, weight,
                         padding, dilation)


def _batch_padded(run, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``run(x, *args, **kwargs)``, on a GPU with the batch padded with zeros to the next power
    of two and the result cut back to it (each sample's result unchanged: the convolutions
    treat samples independently). cuDNN plans every new input shape afresh, and the solvers'
    working sets shrink one finished sample at a time, so a solve met hundreds of batch sizes
    once each: on an H200 the first solve of 512 blur crops took 12.7 s and the same solve
    repeated in the process 7.7; with the padding 8.8 and 8.2 (256 tomography crops: 9.8 and
    6.7 s; padded 6.2 and 6.7). On the CPU, which plans nothing, ``run(x, ...)`` as it is."""
    n = len(x)
    size = 1 << max(0, n - 1).bit_length()
    if x.device.type not in PAD_BATCH_ON or size == n:
        return run(x, *args, **kwargs)
    zeros = x.new_zeros(size - n, *x.shape[1:])
    return run(torch.cat([x, zeros]), *args, **kwargs)[:n]


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


def _on_both_axes(per_axis, t: torch.Tensor, pad: int) -> torch.Tensor:
    """``per_axis(t, pad, dim)`` on the last two axes in turn (nothing where ``pad`` is 0)."""
    return t if pad == 0 else per_axis(per_axis(t, pad, -2), pad, -1)


def symmetric_pad(z: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-sample symmetric padding of the last two axes (needs ``pad <= H, W``). Slices and
    flips, not ``index_select``: 4-5x faster on 64 images of 64x64 (0.25-0.35 ms against 1.2)."""
    return _on_both_axes(_mirror_axis, z, pad)


def symmetric_pad_adjoint(g: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`symmetric_pad`: mirrored samples are added back where they came from."""
    return _on_both_axes(_fold_axis, g, pad)


def _wrap_axis(z: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Extend axis ``dim`` by ``pad`` samples on each side, taken from the other end
    (``[n-1 | 0 1 ... n-1 | 0]``): the periodic extension."""
    n = z.shape[dim]
    return torch.cat([z.narrow(dim, n - pad, pad), z, z.narrow(dim, 0, pad)], dim)


def _unwrap_axis(g: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """The adjoint of :func:`_wrap_axis`: the wrapped samples are added back to their sources."""
    n = g.shape[dim] - 2 * pad
    inner = g.narrow(dim, pad, n).clone()
    inner.narrow(dim, n - pad, pad).add_(g.narrow(dim, 0, pad))
    inner.narrow(dim, 0, pad).add_(g.narrow(dim, n + pad, pad))
    return inner


def periodic_pad(z: torch.Tensor, pad: int) -> torch.Tensor:
    """Periodic padding of the last two axes (needs ``pad <= H, W``)."""
    return _on_both_axes(_wrap_axis, z, pad)


def periodic_pad_adjoint(g: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`periodic_pad`: wrapped samples are added back where they came from."""
    return _on_both_axes(_unwrap_axis, g, pad)


# an image's extension beyond its border, by name: the padding and its adjoint
PADDINGS = {"symmetric": (symmetric_pad, symmetric_pad_adjoint),
            "periodic": (periodic_pad, periodic_pad_adjoint)}


def padded_conv_matrix(kernel: torch.Tensor, height: int, width: int,
                       boundary: str = "symmetric") -> torch.Tensor:
    """The ``(H W) x (H W)`` sparse COO matrix (coalesced) of ``F.conv2d(pad(z, p), kernel)`` on
    one channel of row-major flattened ``H x W`` images, ``pad`` the padding of ``boundary``
    (:data:`PADDINGS`): ``kernel`` is ``k x k``, ``k`` odd, ``p = k // 2 <= H, W``. Entries that
    the padding folds onto one pixel are summed. The padded image of pixel indices says which
    pixel each tap reads (float64 holds them exactly)."""
    size = kernel.shape[-1]
    pixels = torch.arange(height * width, dtype=torch.float64, device=kernel.device)
    pad = PADDINGS[boundary][0]
    source = pad(pixels.view(1, 1, height, width), size // 2)[0, 0].long()
    cols = torch.stack([source[a:a + height, b:b + width].flatten()
                        for a in range(size) for b in range(size)]).flatten()
    rows = torch.arange(height * width, device=kernel.device).repeat(size * size)
    values = kernel.reshape(-1)[:, None].expand(-1, height * width).flatten()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values,
                                   (height * width, height * width),
                                   check_invariants=False).coalesce()
