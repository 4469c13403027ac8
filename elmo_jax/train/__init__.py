"""Pretraining and fine-tuning a biLM with bilm-tf's semantics (data, loss, trainer, evaluation, export, CLI).

Nothing in the embedding path imports this package.
"""

from .trainer import TrainConfig, Trainer, TrainError, load_config

__all__ = ["TrainConfig", "TrainError", "Trainer", "load_config"]
