"""The ``beyondlora`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import DemoConfig, run_demo

    torch.set_num_threads(args.threads)
    figures = run_demo(DemoConfig(adapt_steps=args.steps, rank=args.rank), output_dir=args.output_dir)
    gained = figures["adapted_accuracy_new_domain"] - figures["base_accuracy_new_domain"]
    print(f"the adapter raised accuracy on the new domain by {100 * gained:.1f} points")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyondlora",
        description="Parameter-efficient fine-tuning beyond plain LoRA: LoRA/LoCon, LoHa, LoKr, (IA)³, DyLoRA, "
        "Full, Norm and DoRA for any PyTorch model.",
    )
    parser.add_argument("--version", action="version", version=f"beyondlora {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="adapt a small model with LoKr, save, reload and merge it (offline, CPU)")
    demo.add_argument("--steps", type=int, default=120, help="adapter training steps (default: 120)")
    demo.add_argument("--rank", type=int, default=4, help="LoKr rank (default: 4)")
    demo.add_argument("--output-dir", default=None, help="where to save the adapter folder (default: a temporary one)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
