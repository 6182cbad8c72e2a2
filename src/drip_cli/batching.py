"""Per-sample arithmetic on batch-first tensors, shared by operators, solvers and training."""

from __future__ import annotations

import torch


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_i, b_i>`` for each sample ``i``, shape ``(N,)``."""
    return (a * b).flatten(1).sum(1)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(N,)`` values to broadcast against ``like`` (``(N, ...)``)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def channels_as_samples(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` as ``(N C, 1, H, W)``: each channel a sample of its own, sample by
    sample (a single-channel model on each channel, ``drip reconstruct --each-channel``)."""
    return t.reshape(t.shape[0] * t.shape[1], 1, *t.shape[2:])
