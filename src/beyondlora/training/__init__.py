"""Training: ``beyondlora train`` (config, data, trainer, checkpoints) and the built-in offline demo."""

from .settings import TrainConfig, TrainConfigError
from .trainer import train as run

__all__ = ["TrainConfig", "TrainConfigError", "train"]


def train(config: TrainConfig) -> int:
    """Run a training configuration; returns the exit status (see :func:`beyondlora.training.trainer.train`)."""
    return run(config)
