"""The ``beyondlora`` command: the demo and the adapter tools (extract, merge, resize, convert, inspect).

Every tool reports a bad input as one line ``beyondlora <command>: error: <message>`` on stderr and exits
with status 2, leaving no output file behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ._version import __version__
from .demos.cnn import DemoConfig, run_demo
from .evaluation.command import add_evaluate_parser
from .tools.convert_files import convert_file
from .tools.extract import ExtractOptions, extract, extract_names
from .tools.inspect import format_inspection, inspect, to_json
from .tools.merge import merge
from .tools.model_files import DTYPES
from .tools.resize import resize
from .training.command import add_train_parser
from .training.sample_command import add_sample_parser

DTYPE_CHOICES = ("fp16", "bf16", "fp32")


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _dtype(name: str | None):
    return None if name is None else DTYPES[name]


def _demo(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    figures = run_demo(DemoConfig(adapt_steps=args.steps, rank=args.rank), output_dir=args.output_dir)
    gained = figures["adapted_accuracy_new_domain"] - figures["base_accuracy_new_domain"]
    print(f"the adapter raised accuracy on the new domain by {100 * gained:.1f} points")
    return 0


def _extract(args: argparse.Namespace) -> int:
    _threads(args)
    options = ExtractOptions(
        algo=args.algo,
        mode=args.mode,
        linear_dim=args.linear_dim,
        conv_dim=args.conv_dim,
        linear_param=args.linear_param,
        conv_param=args.conv_param,
        tucker=args.tucker,
        factor=args.factor,
        min_diff=args.min_diff,
        device=args.device,
        dtype=_dtype(args.dtype),
        exact_svd=args.exact_svd,
    )
    extract(args.base, args.tuned, args.out, options, echo=print, overwrite=args.overwrite)
    return 0


def _merge(args: argparse.Namespace) -> int:
    _threads(args)
    merge(args.base, args.adapters, args.out, args.multiplier, _dtype(args.dtype), echo=print, overwrite=args.overwrite)
    return 0


def _resize(args: argparse.Namespace) -> int:
    _threads(args)
    if args.dynamic_method is not None and args.dynamic_param is None:
        raise ValueError("--dynamic-method needs --dynamic-param")
    resize(
        args.adapter,
        args.out,
        args.rank,
        args.dynamic_method,
        args.dynamic_param,
        _dtype(args.dtype),
        echo=print,
        overwrite=args.overwrite,
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    _threads(args)
    destination, dtype = args.destination, _dtype(args.dtype)
    print(convert_file(args.source, destination, args.base, dtype, args.prefix, args.layout, overwrite=args.overwrite))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    _threads(args)
    info = inspect(args.file, args.base)
    print(to_json(info) if args.json else format_inspection(info))
    return 0


def _add_tools(commands: argparse._SubParsersAction) -> None:
    extract = commands.add_parser(
        "extract",
        help="the difference between a fine-tuned model and its base, as a LoCon or LoKr adapter",
        description="Extract tuned − base as an adapter file. BASE and TUNED: diffusers model folders, "
        "single-file SD checkpoints or any safetensors state dicts, of the same layout.",
    )
    extract.add_argument("base")
    extract.add_argument("tuned")
    extract.add_argument("out", help="the adapter file to write (.safetensors)")
    extract.add_argument("--algo", choices=extract_names(), default="locon")
    extract.add_argument(
        "--mode",
        choices=("fixed", "threshold", "ratio", "quantile", "full"),
        default="fixed",
        help="rank per layer: fixed (the dims), threshold (σ > X), ratio (σ > σ_max/X), quantile "
        "(smallest rank with Σσ ≥ X·Σσ), full (store the exact difference)",
    )
    extract.add_argument(
        "--linear-dim",
        type=int,
        help="rank for linear layers and 1×1 convs (locon default 32; lokr: rank of W2, full when omitted)",
    )
    extract.add_argument("--conv-dim", type=int, help="rank for k×k convs (as --linear-dim)")
    extract.add_argument("--linear-param", type=float, help="X for threshold / ratio / quantile")
    extract.add_argument("--conv-param", type=float, help="X for k×k convs (default: --linear-param)")
    extract.add_argument("--tucker", action="store_true", help="locon: Tucker core (lora_mid) for k×k convs")
    extract.add_argument(
        "--factor", type=int, default=-1, help="lokr: cap on the smaller Kronecker factor (-1: balanced)"
    )
    extract.add_argument(
        "--min-diff", type=float, default=1e-6, help="skip layers with max|ΔW| ≤ this × max|W_base| (default 1e-6)"
    )
    extract.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, cuda:1, …)")
    extract.add_argument("--dtype", choices=DTYPE_CHOICES, help="save dtype (default: the base model's)")
    extract.add_argument("--exact-svd", action="store_true", help="full SVD even where a randomized one is cheaper")
    extract.add_argument("--threads", type=int, help="torch CPU threads")
    extract.add_argument("--overwrite", action="store_true", help="replace OUT even where it is BASE or TUNED")
    extract.set_defaults(handler=_extract)

    merge = commands.add_parser(
        "merge",
        help="bake adapters into a model's weights, written in the model's format",
        description="Merge one or more adapters (single files from beyondlora, LyCORIS or kohya, or PEFT folders) "
        "into BASE and write the result in BASE's format.",
    )
    merge.add_argument("base")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER")
    merge.add_argument("--out", required=True, help="the merged model (a .safetensors file, or a new folder)")
    merge.add_argument("--multiplier", type=float, nargs="+", help="strength: one for all, or one per adapter")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating tensors (default: keep each dtype)")
    merge.add_argument("--threads", type=int, help="torch CPU threads")
    merge.add_argument("--overwrite", action="store_true", help="replace --out even where it is an input")
    merge.set_defaults(handler=_merge)

    resize = commands.add_parser(
        "resize",
        help="shrink LoRA / LoCon / DyLoRA ranks by SVD",
        description="Cut every LoRA module of a single file to a smaller rank, keeping ΔW as close as the rank allows.",
    )
    resize.add_argument("adapter")
    resize.add_argument("out")
    resize.add_argument("--rank", type=int, help="the new rank (with a dynamic method: the largest allowed)")
    resize.add_argument("--dynamic-method", choices=("sv_ratio", "sv_fro", "sv_cumulative"))
    resize.add_argument("--dynamic-param", type=float)
    resize.add_argument("--dtype", choices=DTYPE_CHOICES, help="save dtype (default: as in the source)")
    resize.add_argument("--threads", type=int, help="torch CPU threads")
    resize.add_argument("--overwrite", action="store_true", help="replace OUT even where it is ADAPTER")
    resize.set_defaults(handler=_resize)

    convert = commands.add_parser(
        "convert",
        help="an adapter between a single file, a PEFT folder and diffusers' LoRA layout",
        description="Convert an adapter; the format follows DESTINATION (.safetensors: single file; else a PEFT "
        "folder; --layout diffusers: diffusers' LoRA layout). A diffusers-layout source is recognized by its keys. "
        "Conversions involving a PEFT folder, or writing diffusers' layout, need --base.",
    )
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--base", help="the base model (needed to recover module names)")
    convert.add_argument("--prefix", help="single-file key prefix (default: from the base, e.g. lora_unet)")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES)
    convert.add_argument(
        "--layout",
        choices=("auto", "diffusers"),
        default="auto",
        help="diffusers: write DESTINATION in diffusers' LoRA layout (LoRA only; needs --base, a diffusers folder)",
    )
    convert.add_argument("--threads", type=int, help="torch CPU threads")
    convert.add_argument("--overwrite", action="store_true", help="replace DESTINATION even where it is an input")
    convert.set_defaults(handler=_convert)

    inspect = commands.add_parser("inspect", help="modules, algorithms, ranks, parameters and ΔW norms of an adapter")
    inspect.add_argument("file", help="a .safetensors adapter or a PEFT adapter folder")
    inspect.add_argument("--base", help="the base model: ΔW of (IA)³ and DoRA, and ‖ΔW‖/‖W‖")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--threads", type=int, help="torch CPU threads")
    inspect.set_defaults(handler=_inspect)


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
    _add_tools(commands)
    add_train_parser(commands)
    add_sample_parser(commands)
    add_evaluate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes logs, on import, that its 4-bit CPU kernels are missing: nothing the commands run uses them
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers says, once per image processor class the pipelines import, that it falls back to its PIL
    # backend without torchvision: the commands use no image processor
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return args.handler(args)
    try:
        return args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of the tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError) as error:  # FileNotFoundError, FormatError and bad values included
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"beyondlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
