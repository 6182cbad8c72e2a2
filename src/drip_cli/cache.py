"""Values derived from a module's parameters, kept until the parameters change."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def cached_for_parameters(owner: torch.nn.Module, name: str, key: tuple,
                          parameters: Iterable[torch.Tensor], compute: Callable):
    """``compute()``, kept on ``owner`` as ``name`` for ``key`` and the current values of
    ``parameters`` (compared exactly, so an optimiser step, a cast or a move recomputes it); one
    value is kept, the last asked for."""
    snapshot = tuple(p.detach() for p in parameters)
    cached = getattr(owner, name, None)
    if (cached is not None and cached[0] == key
            and all(_same(a, b) for a, b in zip(cached[1], snapshot, strict=True))):
        return cached[2]
    value = compute()
    setattr(owner, name, (key, tuple(p.clone() for p in snapshot), value))
    return value
