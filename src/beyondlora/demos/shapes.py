"""The built-in demo's base model and data: a tiny text-to-image diffusion model of coloured shapes.

* **Images** are 16×16 RGB drawings of one filled shape on black (:func:`draw_shape`).  The base model
  was pre-trained (``scripts/pretrain_demo_base.py``) on red/green/blue circles and squares; the demo's
  concept is a *yellow cross*, a colour and a shape it never saw.
* **Latents** come from a fixed, non-learned pixel ↔ latent map instead of a trained VAE (there is no time
  to train one on a laptop CPU): the latent of an image is its RGB scaled to [−1, 1] plus their mean as a
  fourth channel, at the same 16×16 resolution (:class:`PixelCodec`).
* **UNet**: diffusers' ``UNet2DConditionModel`` with SD 1.x's block layout (so module and file names are
  SD 1.5's), small channels.  **Text encoder**: a tiny ``CLIPTextModel`` with a character tokenizer,
  seeded random and frozen.  **Scheduler**: DDPM with SD's scaled-linear betas.

The pre-trained weights (float16, ~2 MB) are package data under ``assets/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tiny_pipelines import clip_text_config, randomize_weights, sd_train_scheduler, tiny_tokenizer

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "demo_base.safetensors"
SIZE = 16
BASE_COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0)}
BASE_SHAPES = ("circle", "square")
CONCEPT = ("yellow", "cross")
CONCEPT_COLOUR = (1.0, 0.9, 0.05)
CONCEPT_PROMPT = "a yellow cross"


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """A boolean (size, size) mask of ``shape`` centred at (cx, cy) with half-extent ``radius``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape == "cross":
        arm = radius * 0.38
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(
    shape: str, colour: tuple[float, float, float], rng: np.random.Generator, size: int = SIZE
) -> np.ndarray:
    """A float32 (size, size, 3) image in [0, 1]: one shape of random position and size on black."""
    radius = rng.uniform(0.26, 0.36) * size
    cx, cy = rng.uniform(radius + 0.5, size - radius - 0.5, size=2)
    mask = shape_mask(shape, size, cx, cy, radius)
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[mask] = colour
    return image


def base_examples(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``count`` images and prompts of the base model's vocabulary (colours × shapes)."""
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    names = list(BASE_COLOURS)
    for _ in range(count):
        colour, shape = names[rng.integers(len(names))], BASE_SHAPES[rng.integers(len(BASE_SHAPES))]
        images.append(draw_shape(shape, BASE_COLOURS[colour], rng))
        prompts.append(f"a {colour} {shape}")
    return images, prompts


def write_concept_dataset(folder: str | Path, count: int = 8, repeats: int = 10, seed: int = 1) -> Path:
    """Write the demo concept (``count`` yellow crosses) as a kohya folder ``<repeats>_cross`` of PNGs with
    same-name ``.txt`` captions; returns the dataset root."""
    from PIL import Image

    root = Path(folder)
    sub = root / f"{repeats}_cross"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = draw_shape(CONCEPT[1], CONCEPT_COLOUR, rng)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(sub / f"cross_{index:02d}.png")
        (sub / f"cross_{index:02d}.txt").write_text(CONCEPT_PROMPT)
    return root


def concept_score(images: torch.Tensor) -> torch.Tensor:
    """Per image (N, 3, H, W in [0, 1]): how much of it looks like the concept, in [0, 1].

    The intersection-over-union between the image's concept-coloured pixels (within 0.35 of yellow) and the
    best-placed cross of the image's own extent: 1 is a perfect yellow cross, 0 no yellow cross at all."""
    colour = torch.tensor(CONCEPT_COLOUR).view(1, 3, 1, 1)
    yellow = (images - colour).norm(dim=1) < 0.35  # (N, H, W)
    scores = []
    for mask in yellow:
        if not mask.any():
            scores.append(0.0)
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        cy, cx = (ys.float().mean() + 0.5).item(), (xs.float().mean() + 0.5).item()
        extent = max((ys.max() - ys.min()).item(), (xs.max() - xs.min()).item()) / 2 + 0.5
        template = torch.from_numpy(shape_mask("cross", mask.shape[-1], cx, cy, max(extent, 1.0)))
        scores.append(((mask & template).sum() / (mask | template).sum()).item())
    return torch.tensor(scores)


@dataclass
class PixelCodec:
    """The demo's fixed pixel ↔ latent map (no learned VAE): latent = [2·rgb − 1, mean of those]."""

    scale_factor: int = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [−1, 1] → (N, 4, H, W)."""
        return torch.cat([images, images.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, H, W) → (N, 3, H, W) in [0, 1]."""
        return ((latents[:, :3] + 1) / 2).clamp(0, 1)


def build_demo_models(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(unet, text_encoder, tokenizer, scheduler) of the demo base, seeded random (before pre-training)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    randomize_weights(text_encoder, seed=seed)
    unet = UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, tokenizer, sd_train_scheduler()


def load_demo_models() -> tuple[Any, Any, Any, Any]:
    """The pre-trained demo base: (unet, text_encoder, tokenizer, scheduler), float32, eval mode."""
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the demo base weights {WEIGHTS} are missing; run scripts/pretrain_demo_base.py to make them"
        )
    unet, text_encoder, tokenizer, scheduler = build_demo_models()
    state = load_file(str(WEIGHTS))
    unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[3:]: v.float() for k, v in state.items() if k.startswith("te.")})
    return unet.eval(), text_encoder.eval(), tokenizer, scheduler
