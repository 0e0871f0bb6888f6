"""The base model of a run: the demo, a tiny offline SD pipeline, a diffusers folder or a single file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..demos.tiny_dit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline
from ..demos.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from .flow_matching import FlowMatching
from .noise_prediction import NoisePrediction
from .objective import Objective
from .settings import TrainConfigError
from .storage import store_weights


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
    objective: Objective
    is_demo: bool = False
    #: images per step per process when the run does not say
    batch_size: int = 8

    @property
    def denoiser(self) -> Any:
        """The model that is adapted and trained: the UNet, or the transformer of a DiT."""
        return getattr(self.pipe, self.objective.denoiser)

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def text_encoder(self) -> Any:
        return self.pipe.text_encoder

    @property
    def is_xl(self) -> bool:
        """SDXL: a UNet with two text encoders, pooled-text and size conditioning."""
        return self.objective.denoiser == "unet" and getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def text_encoders(self) -> list[Any]:
        """Every text encoder of the pipeline, in order (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5)."""
        return [getattr(self.pipe, name) for name in _TEXT_ENCODERS if getattr(self.pipe, name, None) is not None]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, self.pipe.tokenizer_2] if self.is_xl else [self.tokenizer]


class _Parts:
    """A stand-in pipeline holding the demo's UNet and text encoder."""

    def __init__(self, unet: Any, text_encoder: Any) -> None:
        self.unet = unet
        self.text_encoder = text_encoder


#: base models built offline, by name
BUILT_IN = ("demo", "tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: T5's sequence length in training, as the pipelines default to it (at most the tokenizer's)
_T5_TOKENS = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}
#: the side of a DiT without a ``sample_size`` in its config (Flux) when no resolution is given
_DIT_RESOLUTION = 1024
#: a key only SDXL checkpoints have (the second, OpenCLIP text encoder)
_SDXL_KEY = "conditioner.embedders.1"
#: what diffusers fetches of a model repository for ``from_single_file``: configs and tokenizer files
_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def check_model_path(name: str, base_config: str | None = None) -> None:
    """Refuse a base model path (and ``--base-config`` folder) of the wrong kind before anything is loaded."""
    if name in BUILT_IN:
        _refuse_base_config(name, base_config)
        return
    path = Path(name)
    if not path.exists():
        raise TrainConfigError(
            f"base model {path} does not exist (give a diffusers folder, a .safetensors "
            f"single-file checkpoint, or one of {', '.join(BUILT_IN)}; nothing is downloaded)"
        )
    if path.is_dir():
        denoiser = (path / "unet").is_dir() or (path / "transformer").is_dir()
        if not (path / "model_index.json").is_file() or not denoiser:
            raise TrainConfigError(
                f"base model folder {path} is not a diffusers pipeline (no model_index.json and unet/ or transformer/)"
            )
        _refuse_base_config(name, base_config)
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
        if base_config is not None:
            _check_base_config(Path(base_config), is_xl=any(k.startswith(_SDXL_KEY) for k in keys))


def _refuse_base_config(name: str, base_config: str | None) -> None:
    if base_config is not None:
        raise TrainConfigError(
            f"--base-config applies to a single-file --pretrained-model only, not to {name!r} (which has its own "
            "configuration)"
        )


def _check_base_config(folder: Path, is_xl: bool) -> None:
    """``folder`` must be a diffusers pipeline folder of the checkpoint's kind (SD or SDXL)."""
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise TrainConfigError(f"--base-config {folder} {problem} (give a diffusers pipeline folder)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise TrainConfigError(
            f"--base-config {folder} is not a diffusers pipeline folder (no model_index.json); give the folder of "
            "a diffusers model of the checkpoint's architecture (its configs and tokenizers are enough)"
        )
    try:
        class_name = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError) as error:
        raise TrainConfigError(f"--base-config {folder}: unreadable model_index.json ({error})") from None
    if class_name and ("XL" in class_name) != is_xl:
        kind = "an SDXL" if is_xl else "an SD 1.x/2.x"
        raise TrainConfigError(
            f"--base-config {folder} holds a {class_name}'s configuration, but the checkpoint is {kind} model"
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


def load_base_model(
    name: str, device: torch.device, base_config: str | None = None, precision: str = "fp32"
) -> BaseModel:
    """Load the base (frozen, eval mode) on ``device``, never downloading anything.

    ``base_config``: for a single-file checkpoint, a diffusers pipeline folder whose configs and tokenizer(s)
    describe it (its weights, if any, are not used).  Without it, the configuration of the model diffusers
    infers from the checkpoint's keys must already be in the local Hugging Face cache.  ``precision``: the
    storage of the denoiser's and the text encoders' weights (:func:`.storage.store_weights`; adapters stay
    float32; the VAE, which runs once per image when latents are cached, stays float32).
    """
    check_model_path(name, base_config)
    if name == "demo":
        from ..demos.shapes import SIZE, PixelCodec, load_demo_models  # lazy: pulls in numpy

        unet, text_encoder, tokenizer, scheduler = load_demo_models()
        codec = PixelCodec()
        pipe = _Parts(unet.to(device), text_encoder.to(device))
        objective = NoisePrediction(scheduler, 1)
        return BaseModel(pipe, tokenizer, scheduler, codec.encode, codec.decode, SIZE, 1, objective, is_demo=True)
    tiny = {"tiny-sd": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline}
    tiny.update({"tiny-sd3": tiny_sd3_pipeline, "tiny-flux": tiny_flux_pipeline})
    if name in tiny:
        pipe = tiny[name]()
    else:
        from diffusers import DiffusionPipeline

        path = Path(name)
        if path.is_dir():
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None)
        else:
            pipe = _load_single_file(path, base_config)
    if getattr(pipe, "transformer", None) is not None:
        return _dit_base(pipe, name, device, precision)
    from diffusers import DDPMScheduler

    for part in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if part is not None:
            store_weights(part.requires_grad_(False).eval().to(device), precision)
    pipe.vae.requires_grad_(False).eval().to(device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encode, decode = _vae_codec(pipe.vae)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = pipe.unet.config.sample_size * scale
    base = BaseModel(
        pipe, pipe.tokenizer, scheduler, encode, decode, resolution, scale, NoisePrediction(scheduler, scale)
    )
    if name not in BUILT_IN:  # a real model: what fits a consumer GPU at its resolution
        base.batch_size = 1 if base.is_xl else 2
    return base


def _dit_base(pipe: Any, name: str, device: torch.device, precision: str) -> BaseModel:
    """SD3 or Flux: the transformer trained by flow matching on ``device``; the text encoders frozen on the
    CPU (T5-XXL alone is 4.7 B parameters; each caption is embedded once, :class:`.FlowMatching`)."""
    store_weights(pipe.transformer.requires_grad_(False).eval().to(device), precision)
    pipe.vae.requires_grad_(False).eval().to(device)
    for part in (getattr(pipe, n, None) for n in _TEXT_ENCODERS):
        if part is not None:
            store_weights(part.requires_grad_(False).eval().to("cpu"), precision)
    flux = type(pipe).__name__.startswith("Flux")
    t5 = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    tokens = min(_T5_TOKENS.get(type(pipe).__name__, 256), t5.model_max_length)
    guidance = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    objective = FlowMatching(dict(pipe.scheduler.config), flux, guidance, tokens)
    encode, decode = _vae_codec(pipe.vae)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample_size = getattr(pipe.transformer.config, "sample_size", None)
    resolution = sample_size * scale if sample_size else 64 if name in BUILT_IN else _DIT_RESOLUTION
    base = BaseModel(pipe, pipe.tokenizer, pipe.scheduler, encode, decode, resolution, scale, objective)
    if name not in BUILT_IN:
        base.batch_size = 1
    return base


def _load_single_file(path: Path, base_config: str | None) -> Any:
    """A pipeline from an original-layout checkpoint, with the configs of ``base_config`` or of the cache."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if _is_sdxl(path) else StableDiffusionPipeline
    folder = base_config if base_config is not None else _cached_config(path)
    try:
        # a local ``config`` folder: diffusers reads the configs and tokenizers there, the weights from the file
        return cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds here
        source = f"--base-config {folder}" if base_config is not None else f"the cached configuration {folder}"
        raise TrainConfigError(
            f"cannot build a {cls.__name__} from {path} with {source} ({type(error).__name__}: {error}); "
            "--base-config must be a diffusers folder of the checkpoint's exact architecture"
        ) from None


def _cached_config(path: Path) -> str:
    """The folder of configs ``from_single_file`` would use for ``path``, from the local Hugging Face cache only.

    diffusers infers a default repository from the checkpoint's keys and shapes (read here without loading a
    tensor) and, when its configs are not cached, downloads them even with ``local_files_only=True``; looking
    the snapshot up here first keeps the run offline.
    """
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    hint = "pass --base-config with a diffusers folder of the checkpoint's architecture (its configs and tokenizers)"
    with safe_open(str(path), "pt") as handle:
        shapes = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}  # noqa: SIM118
    try:
        repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    except Exception as error:  # noqa: BLE001 - diffusers' model-type inference
        raise TrainConfigError(f"cannot tell which model {path} is ({type(error).__name__}: {error}); {hint}") from None
    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=_CONFIG_PATTERNS)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises several kinds here
        raise TrainConfigError(
            f"cannot build a pipeline from {path} offline: its configuration ({repo}, as diffusers infers it) is "
            f"not in the local Hugging Face cache ({type(error).__name__}); {hint}"
        ) from None


def _is_sdxl(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(k.startswith(_SDXL_KEY) for k in handle.keys())  # noqa: SIM118
