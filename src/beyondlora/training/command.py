"""The ``beyondlora train`` subcommand: ``beyondlora train [CONFIG.toml] [--flags]``."""

from __future__ import annotations

import argparse

from .settings import add_arguments, config_from_args
from .trainer import train

DESCRIPTION = (
    "Fine-tune Stable Diffusion with any adapter algorithm. With no arguments: the built-in offline demo "
    "(a tiny pre-trained shapes model learns a yellow cross with LoKr in a few minutes on a CPU). Every "
    "option is also a key of the optional TOML file; flags override the file. Several processes: "
    "torchrun --nproc_per_node N -m beyondlora train …"
)


def _train(args: argparse.Namespace) -> int:
    return train(config_from_args(args))


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="fine-tune Stable Diffusion (default: the offline demo)", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(handler=_train)
