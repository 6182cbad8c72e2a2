"""Bi-level training of DRIP models."""

from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
