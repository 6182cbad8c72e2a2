"""The learned parts of DRIP: the embedding ``E`` and scalar regularizers ``R(z)``."""

from .convex import ConvexFilterRegularizer
from .embedding import Embedding
from .leapfrog import LeapfrogRegularizer

__all__ = ["ConvexFilterRegularizer", "Embedding", "LeapfrogRegularizer"]
