"""Training: ``beyondlora train`` (settings, data, trainer, resume); its default job is the built-in offline demo
(:mod:`beyondlora.demos.shapes`)."""

from .settings import TrainConfig, TrainConfigError
from .trainer import train as _run

__all__ = ["TrainConfig", "TrainConfigError", "train"]


def train(config: TrainConfig) -> int:
    """Run a training configuration; returns the exit status (see :func:`beyondlora.training.trainer.train`)."""
    return _run(config)
