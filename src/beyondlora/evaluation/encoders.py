"""Image (and text) features for the metrics: a local CLIP or DINOv2 folder through transformers, or, with no
learned encoder at all, the pixels themselves.  Nothing is ever downloaded (``local_files_only=True``).

Every encoder gives, for images (N, 3, H, W) in [0, 1], a global feature per image (N, D) and spatial
features (N, T, D) for Gram-matrix style losses.  CLIP also embeds text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: CLIP's and ImageNet's per-channel normalisation, used when a folder has no preprocessor_config.json
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: side of the pixel encoder's images: its features are the RGB values of a PIXEL_SIDE² thumbnail
PIXEL_SIDE = 16
BATCH = 32
#: what each learned encoder's features are
ENCODER_LABELS = {"clip": "CLIP image embeddings", "dino": "DINOv2 class tokens"}


@dataclass
class Features:
    """``vectors`` (N, D): one feature per image; ``tokens`` (N, T, D): spatial features of the same images."""

    vectors: torch.Tensor
    tokens: torch.Tensor


class PixelEncoder:
    """No learned encoder: an image's feature is its RGB thumbnail (area-averaged to 16×16, flattened: 768
    values); its spatial features are the thumbnail's pixels (T = 256 positions × 3 colour channels), so its
    Gram matrix is the colour co-occurrence.  Offline and exact, but it sees colours and positions, not
    content: labelled ``pixels`` wherever it is reported."""

    name = "pixels"
    description = f"RGB values of a {PIXEL_SIDE}x{PIXEL_SIDE} thumbnail (no learned encoder)"

    def encode(self, images: torch.Tensor) -> Features:
        """(N, 3, H, W) in [0, 1] → vectors (N, 3·16·16), tokens (N, 256, 3)."""
        small = F.adaptive_avg_pool2d(images.float(), PIXEL_SIDE)
        return Features(small.flatten(1), small.flatten(2).transpose(1, 2))


def _preprocessing(folder: Path, side: int, mean: tuple, std: tuple) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(input side, mean, std): the folder's ``preprocessor_config.json`` where it has one, else the model's
    image size and the given normalisation."""
    config_file = folder / "preprocessor_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        crop = config.get("crop_size", side)
        side = crop.get("height", side) if isinstance(crop, dict) else int(crop)
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    return side, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def square(images: torch.Tensor, side: int) -> torch.Tensor:
    """Resize the shorter edge to ``side`` (bicubic, antialiased) and crop the centre square."""
    height, width = images.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    resized = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return resized[..., top : top + side, left : left + side].clamp(0, 1)


def _load(kind: str, model_type: str, option: str, folder: str | Path, device: str | torch.device) -> Any:
    """``transformers.<kind>`` from ``folder``, refused (naming ``option``) unless the folder holds exactly
    that model: transformers would fill a wrong or partial folder with random weights and only warn."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        problem = "does not exist" if not folder.exists() else "has no config.json"
        raise ValueError(f"{option} {folder} {problem} (give a local transformers {kind} folder)")
    try:
        found = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{option} {folder}: unreadable config.json ({error})") from None
    if found != model_type:
        raise ValueError(f"{option} {folder} holds a {found!r} model, not a {kind} ({model_type!r})")
    import transformers

    try:
        model, info = getattr(transformers, kind).from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a wrong folder
        raise ValueError(f"{option} {folder}: cannot load a {kind} ({type(error).__name__}: {error})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{option} {folder}: the weights lack {len(missing)} tensor(s) of a {kind}, e.g. {missing[0]}")
    return model.eval().requires_grad_(False).to(device)


class ClipEncoder:
    """A local CLIP folder (``CLIPModel`` and its tokenizer): projected image and text embeddings; spatial
    features are the vision tower's last patch tokens (class token left out)."""

    name = "clip"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer

        self.model = _load("CLIPModel", "clip", "--clip", folder, device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(
                f"--clip {folder}: no usable tokenizer ({type(error).__name__}: {error}); a CLIP folder needs its "
                "tokenizer files for text similarity"
            ) from None
        side = self.model.config.vision_config.image_size
        self.side, self.mean, self.std = _preprocessing(Path(folder), side, CLIP_MEAN, CLIP_STD)
        self.description = f"CLIPModel from {folder}"
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Features:
        """(N, 3, H, W) in [0, 1] → vectors (N, projection_dim), tokens (N, patches, hidden)."""
        vectors, tokens = [], []
        for chunk in images.split(BATCH):
            pixels = ((square(chunk, self.side) - self.mean) / self.std).to(self.device)
            output = self.model.vision_model(pixel_values=pixels)
            vectors.append(self.model.visual_projection(output.pooler_output).float().cpu())
            tokens.append(output.last_hidden_state[:, 1:].float().cpu())
        return Features(torch.cat(vectors), torch.cat(tokens))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings (N, projection_dim) of ``prompts``."""
        vectors = []
        for start in range(0, len(prompts), BATCH):
            tokens = self.tokenizer(
                prompts[start : start + BATCH], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            output = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            vectors.append(self.model.text_projection(output.pooler_output).float().cpu())
        return torch.cat(vectors)


class DinoEncoder:
    """A local DINOv2 folder (``Dinov2Model``): the class token of the last layer (layer-normed) as the
    image's feature, the patch tokens as its spatial features."""

    name = "dino"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        self.model = _load("Dinov2Model", "dinov2", "--dino", folder, device)
        self.side, self.mean, self.std = _preprocessing(
            Path(folder), self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD
        )
        self.description = f"Dinov2Model from {folder}"
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Features:
        """(N, 3, H, W) in [0, 1] → vectors (N, hidden), tokens (N, patches, hidden)."""
        vectors, tokens = [], []
        for chunk in images.split(BATCH):
            pixels = ((square(chunk, self.side) - self.mean) / self.std).to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state.float().cpu()
            vectors.append(hidden[:, 0])
            tokens.append(hidden[:, 1:])
        return Features(torch.cat(vectors), torch.cat(tokens))
