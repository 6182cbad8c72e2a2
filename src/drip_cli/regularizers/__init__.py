"""The learned parts of DRIP: the embedding ``E`` and scalar regularizers ``R(z)``."""

from .convex import ConvexFilterRegularizer
from .embedding import Embedding

__all__ = ["ConvexFilterRegularizer", "Embedding"]
