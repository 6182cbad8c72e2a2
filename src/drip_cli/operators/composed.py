"""``A E``: a forward operator applied after a linear embedding, as one operator on ``z``."""

from __future__ import annotations

import torch

from .base import LinearOperator


class EmbeddedOperator(LinearOperator):
    """``z -> A(E z)`` with adjoint ``y -> E^T(A^T y)``; ``embedding`` needs ``forward`` and
    ``adjoint`` (see :class:`drip_cli.regularizers.Embedding`). Differentiable in ``E``'s weights."""

    def __init__(self, op: LinearOperator, embedding: torch.nn.Module):
        _, height, width = op.image_shape
        super().__init__((embedding.latent_channels, height, width))
        self.op = op
        self.embedding = embedding
        self.kind = op.kind

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.op.measurement_shape

    @property
    def measured_count(self) -> int:
        return self.op.measured_count

    def project_measurements(self, b: torch.Tensor) -> torch.Tensor:
        return self.op.project_measurements(b)

    def _forward_impl(self, z: torch.Tensor) -> torch.Tensor:
        return self.op(self.embedding(z))

    def _adjoint_impl(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding.adjoint(self.op.adjoint(y))
