"""``beyondlora sample``: images from any base model the trainer takes, with or without an adapter file, for
prompts and seeds, written as one PNG per image and a grid (prompts across, seeds down).

The same seed gives the same image, so a sweep over ``--multiplier`` (0 reproduces the base model) or over
adapters compares like with like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..integrations.diffusers import load_adapter
from .models import load_base_model
from .report import save_image, save_sample_grid
from .sampling import generate

DESCRIPTION = (
    "Generate images with a base model (a diffusers folder, a single-file SD checkpoint, tiny-sd, tiny-sdxl or "
    "demo) and optionally an adapter file or PEFT folder at a strength; writes one PNG per prompt and seed "
    "and a grid."
)


def sample(
    pretrained_model: str,
    prompts: list[str],
    adapter: str | Path | None = None,
    multiplier: float = 1.0,
    seeds: list[int] | None = None,
    steps: int = 20,
    guidance: float | None = None,
    resolution: int | None = None,
    output_dir: str | Path = "samples",
    base_config: str | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Write ``<output_dir>/p<prompt>_s<seed>.png`` for every prompt and seed, and ``grid.png``; returns the
    paths written (the grid last).  ``guidance`` defaults as in training (1.5 for the demo, else 7.5)."""
    if not prompts:
        raise ValueError("give at least one --prompt")
    seeds = [0, 1, 2, 3] if seeds is None else seeds
    base = load_base_model(pretrained_model, torch.device(device), base_config)
    if adapter is not None:
        load_adapter(base.pipe, adapter, multiplier=multiplier)
    images = generate(base, base.text_encoders, prompts, seeds, resolution or base.resolution, steps, guidance)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        seed, prompt = seeds[index // len(prompts)], index % len(prompts)
        written.append(save_image(image, output / f"p{prompt}_s{seed}.png"))
    written.append(save_sample_grid(images, prompts, seeds, output / "grid.png"))
    return written


def _sample(args: argparse.Namespace) -> int:
    paths = sample(
        args.pretrained_model,
        args.prompt,
        args.adapter,
        args.multiplier,
        args.seeds,
        args.steps,
        args.guidance,
        args.resolution,
        args.output_dir,
        args.base_config,
        args.device,
    )
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]}")
    return 0


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample", help="images from a base model, with or without an adapter", description=DESCRIPTION
    )
    parser.add_argument("--pretrained-model", default="demo", help="the base model (default: demo)")
    parser.add_argument("--adapter", help="an adapter file (.safetensors) or PEFT folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--multiplier", type=float, default=1.0, help="adapter strength (default 1; 0 = base)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one image per seed (default: 0 1 2 3)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default 1.5 demo, else 7.5)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--output-dir", default="samples", help="where the PNGs go (default: samples)")
    parser.add_argument("--base-config", help="configs for a single-file checkpoint (as for train)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    parser.set_defaults(handler=_sample)
