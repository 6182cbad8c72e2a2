"""The adjoint of a stride-1 ``conv2d``, by whichever CPU kernel is faster for its shape.

Both ``conv_transpose2d`` and a ``conv2d`` with the flipped, channel-transposed kernel compute
it, but PyTorch's CPU kernels differ by 3-15x depending on how many channels the adjoint sums
over (measured on 64 images of 64x64, float32, 2 threads): summing 8 filter responses into one
channel (a 5x5 filter bank's ``K^T``), ``conv_transpose2d`` took 9.6 ms against 30 ms (dilation
1) and 38 ms (dilation 2); mapping 1 or 2 channels to one (the embedding's 3x3 kernel),
``conv2d`` took 1.0 ms against 3.7 ms. These adjoints run in every solver iteration.

The learned convolutions (the regularizer's filter bank, the embedding ``E``) extend the image
by half-sample symmetric padding, :func:`symmetric_pad`, whose adjoint folds the mirrored samples
back (:func:`symmetric_pad_adjoint`). A constant image then stays constant up to the border: zero
padding pulled border pixels towards 0 (0.6 dB of PSNR on 64x64 blur in the filter bank; in
``E``, whose trained weights do not sum to 1, a dark or bright frame one pixel wide).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# from this many channels summed, conv_transpose2d is the faster kernel on the CPU
TRANSPOSE_FROM_CHANNELS = 4


def conv2d_adjoint(y: torch.Tensor, weight: torch.Tensor, padding: int = 0,
                   dilation: int = 1) -> torch.Tensor:
    """Adjoint of ``F.conv2d(x, weight, padding=padding, dilation=dilation)`` (stride 1, odd
    square kernels)."""
    if weight.shape[0] >= TRANSPOSE_FROM_CHANNELS:
        return F.conv_transpose2d(y, weight, padding=padding, dilation=dilation)
    # correlation with the flipped, channel-transposed kernel at the same dilation
    flipped = weight.flip(-1, -2).transpose(0, 1)
    return F.conv2d(y, flipped, padding=dilation * (weight.shape[-1] - 1) - padding,
                    dilation=dilation)


def _mirror_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a length-``n`` axis extended by ``pad`` mirrored samples on each side, edge
    sample repeated (``[1 0 | 0 1 ... n-1 | n-1 n-2]``): the even, half-sample extension."""
    inner = torch.arange(n, device=device)
    return torch.cat([inner[:pad].flip(0), inner, inner[n - pad:].flip(0)])


def symmetric_pad(z: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-sample symmetric padding of the last two axes (needs ``pad <= H, W``)."""
    if pad == 0:
        return z
    h, w = z.shape[-2:]
    z = z.index_select(-2, _mirror_index(h, pad, z.device))
    return z.index_select(-1, _mirror_index(w, pad, z.device))


def symmetric_pad_adjoint(g: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`symmetric_pad`: mirrored samples are added back where they came from."""
    if pad == 0:
        return g
    h, w = g.shape[-2] - 2 * pad, g.shape[-1] - 2 * pad
    rows = g.new_zeros((*g.shape[:-2], h, g.shape[-1])).index_add(-2, _mirror_index(h, pad, g.device), g)
    return rows.new_zeros((*g.shape[:-2], h, w)).index_add(-1, _mirror_index(w, pad, g.device), rows)
