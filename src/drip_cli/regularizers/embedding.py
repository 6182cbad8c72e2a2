"""The learned embedding ``E``: latent variable ``z`` -> image ``u = E z``.

``E`` is a ``kernel_size x kernel_size`` convolution from ``latent_channels`` to the image's
``C`` channels, the latent extended by half-sample symmetric padding, as the regularizer's filters
extend it; its adjoint is the transposed convolution with the same weights followed by the
padding's adjoint (:mod:`drip_cli.operators.convolution`). With zero padding, as before, the
border pixels lost the share of ``E``'s weights that fell outside: trained weights sum to 0.82 -
1.13, and the tomography model left a frame one pixel wide about 0.03 too dark, which cost 3.9
dB on a flat 64x64 crop of sky (47.1 dB for TV) and 0.27 dB on ``sample_data/tomography.h5``.
It starts as the identity on the first ``C`` latent channels (``E z = z[:, :C]``), so an untrained
model reconstructs in image space.

With ``boundary = "periodic"`` the latent is extended periodically instead, as a periodic operator
(blur, the identity) extends the image: ``A E`` is then a circulant convolution, diagonal in the
Fourier basis, and the projections of the DRIP solver are solved there exactly, in a few FFTs,
instead of by a Krylov method (:mod:`drip_cli.solvers.projection`; ``drip train`` chooses it for
periodic operators). The two boundaries differ in the outer pixel only: the blur sample model,
trained with the symmetric one, scores the same with either (``docs/design.md``).
"""

from __future__ import annotations

import torch

from ..cache import cached_for_parameters
from ..operators.convolution import PADDINGS, conv2d, conv2d_adjoint, padded_conv_matrix
from ..operators.sparse import compact_csr


class Embedding(torch.nn.Module):
    def __init__(self, latent_channels: int, image_channels: int, kernel_size: int = 3,
                 boundary: str = "symmetric"):
        super().__init__()
        if latent_channels < image_channels:
            raise ValueError("latent_channels must be at least the number of image channels")
        if kernel_size % 2 == 0:
            raise ValueError("the embedding kernel size must be odd")
        if boundary not in PADDINGS:
            raise ValueError(f"the embedding boundary must be one of {', '.join(PADDINGS)}, "
                             f"not {boundary!r}")
        self.latent_channels, self.image_channels = latent_channels, image_channels
        self.boundary = boundary
        weight = torch.zeros(image_channels, latent_channels, kernel_size, kernel_size)
        for c in range(image_channels):
            weight[c, c, kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = torch.nn.Parameter(weight)

    def per_channel(self, channels: int) -> Embedding:
        """This embedding of one latent channel into one image channel, on each of
        ``channels`` channels alone (as :class:`~.convex.PerChannelRegularizer` spreads the
        regularizer)."""
        if self.latent_channels != 1 or self.image_channels != 1:
            raise ValueError("per_channel widens an embedding of one channel")
        wide = Embedding(channels, channels, self.weight.shape[-1], self.boundary).to(self.weight)
        with torch.no_grad():
            wide.weight.zero_()
            for c in range(channels):
                wide.weight[c, c] = self.weight[0, 0]
        return wide

    @property
    def padding(self) -> int:
        return self.weight.shape[-1] // 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``u = E z``: ``(N, latent_channels, H, W) -> (N, C, H, W)``."""
        pad = PADDINGS[self.boundary][0]
        return conv2d(pad(z, self.padding), self.weight.to(z.dtype))

    def adjoint(self, u: torch.Tensor) -> torch.Tensor:
        """``E^T u``: ``(N, C, H, W) -> (N, latent_channels, H, W)``."""
        pad_adjoint = PADDINGS[self.boundary][1]
        return pad_adjoint(conv2d_adjoint(u, self.weight.to(u.dtype)), self.padding)

    def sparse_matrices(self, height: int, width: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``E`` and ``E^T`` as CSR matrices on flattened ``height x width`` images (one latent
        and one image channel), for products chained with another sparse matrix
        (:class:`~drip_cli.operators.composed.EmbeddedOperator`). Not differentiable. Kept for
        the last shape, dtype, device and weights asked about."""
        if self.latent_channels != 1 or self.image_channels != 1:
            raise ValueError("the embedding's sparse matrices are for one channel")

        def compute():
            kernel = self.weight.detach()[0, 0].to(device=device, dtype=dtype)
            matrix = padded_conv_matrix(kernel, height, width, self.boundary)
            return tuple(compact_csr(m) for m in (matrix, matrix.t().coalesce()))

        return cached_for_parameters(self, "_sparse", (height, width, dtype, torch.device(device)),
                                     [self.weight], compute)

    def __getstate__(self):
        """Without the cached sparse matrices, which copies and pickles cannot take (and which
        are rebuilt on demand)."""
        state = self.__dict__.copy()
        state.pop("_sparse", None)
        return state
