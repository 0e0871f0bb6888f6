"""The base model of a run: the demo, a tiny offline SD pipeline, a diffusers folder or a single file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfigError


@dataclass
class BaseModel:
    """What training needs of a base model.  ``pipe`` holds ``unet`` and ``text_encoder`` attributes (a
    diffusers pipeline or a stand-in) for :func:`beyondlora.save_adapter`."""

    pipe: Any
    tokenizer: Any
    scheduler: Any
    encode: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) in [−1, 1] → latents
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents → (N, 3, H, W) in [0, 1]
    resolution: int
    scale_factor: int
    is_demo: bool = False

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def text_encoder(self) -> Any:
        return self.pipe.text_encoder

    @property
    def is_xl(self) -> bool:
        """SDXL: two text encoders, pooled-text and size conditioning."""
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def text_encoders(self) -> list[Any]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2] if self.is_xl else [self.pipe.text_encoder]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, self.pipe.tokenizer_2] if self.is_xl else [self.tokenizer]


class _Parts:
    """A stand-in pipeline holding the demo's UNet and text encoder."""

    def __init__(self, unet: Any, text_encoder: Any) -> None:
        self.unet = unet
        self.text_encoder = text_encoder


#: base models built offline, by name
BUILT_IN = ("demo", "tiny-sd", "tiny-sdxl")


def check_model_path(name: str) -> None:
    """Refuse a base model path of the wrong kind before anything is loaded."""
    if name in BUILT_IN:
        return
    path = Path(name)
    if not path.exists():
        raise TrainConfigError(
            f"base model {path} does not exist (give a diffusers folder, a .safetensors "
            "single-file checkpoint, 'demo', 'tiny-sd' or 'tiny-sdxl'; nothing is downloaded)"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
            raise TrainConfigError(
                f"base model folder {path} is not a diffusers pipeline (no model_index.json and unet/)"
            )
    elif path.suffix != ".safetensors":
        raise TrainConfigError(f"base model {path} is not a diffusers folder or a .safetensors checkpoint")
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                keys = list(handle.keys())
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise TrainConfigError(f"base model {path} is not a readable safetensors file: {error}") from None
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise TrainConfigError(
                f"base model {path} is not a Stable Diffusion checkpoint (no "
                "model.diffusion_model.* weights; an adapter file?)"
            )


def _vae_codec(vae: Any) -> tuple[Callable, Callable]:
    factor = getattr(vae.config, "scaling_factor", 0.18215)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        return (vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean.float() - shift) * factor

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        images = vae.decode((latents / factor + shift).to(param.device, param.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    return encode, decode


def load_base_model(name: str, device: torch.device) -> BaseModel:
    """Load the base (frozen, eval mode) on ``device``."""
    check_model_path(name)
    if name == "demo":
        from .demo_model import SIZE, PixelCodec, load_demo_models

        unet, text_encoder, tokenizer, scheduler = load_demo_models()
        codec = PixelCodec()
        pipe = _Parts(unet.to(device), text_encoder.to(device))
        return BaseModel(pipe, tokenizer, scheduler, codec.encode, codec.decode, SIZE, 1, is_demo=True)
    if name == "tiny-sd":
        from ..integrations.tiny_pipeline import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    elif name == "tiny-sdxl":
        from ..integrations.tiny_pipeline import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline()
    else:
        from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        path = Path(name)
        if path.is_dir():
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None)
        else:
            is_xl = _is_sdxl(path)
            cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
            try:
                pipe = cls.from_single_file(str(path), local_files_only=True)
            except Exception as error:  # noqa: BLE001 - diffusers raises many kinds here
                raise TrainConfigError(
                    f"cannot build a pipeline from {path} offline ({type(error).__name__}: {error}); diffusers "
                    "needs the model's configuration in the local Hugging Face cache, or convert the file to a "
                    "diffusers folder"
                ) from None
    from diffusers import DDPMScheduler

    for part in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae):
        if part is not None:
            part.requires_grad_(False).eval().to(device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encode, decode = _vae_codec(pipe.vae)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = pipe.unet.config.sample_size * scale
    return BaseModel(pipe, pipe.tokenizer, scheduler, encode, decode, resolution, scale)


def _is_sdxl(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(k.startswith("conditioner.embedders.1") for k in handle.keys())  # noqa: SIM118
