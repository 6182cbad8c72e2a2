"""drip: learned regularization of inverse problems (DRIP, Eliasof, Haber & Treister 2024)."""

__version__ = "0.1.0"
