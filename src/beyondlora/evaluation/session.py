"""One evaluation: the prompt sets, the encoders and the training images, applied to the base model first
and then to any number of fine-tuned models, each given as a function that renders prompts × seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..training.sampling import generate
from .encoders import ENCODER_LABELS, Features, square
from .generation import ImageCache, Render
from .prompts import PromptSet
from .scoring import ENCODER_OPTIONS, QUALITY_PROMPTS, Context, Row, score

BASE = "base"


def load_reference(paths: list[Path], side: int) -> torch.Tensor:
    """Training images as (M, 3, side, side) in [0, 1]: shorter edge resized to ``side``, centre square."""
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        images.append(square(torch.from_numpy(array).permute(2, 0, 1)[None], side)[0])
    return torch.stack(images)


def base_render(base: Any, text_encoders: list[Any], resolution: int, steps: int, guidance: float | None) -> Render:
    """Render prompts × seeds with ``base`` (a :class:`~beyondlora.training.models.BaseModel`) as it is now,
    adapters included, through :func:`~beyondlora.training.sampling.generate`."""

    def render(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return generate(base, text_encoders, prompts, seeds, resolution, steps, guidance)

    return render


@dataclass
class Session:
    """Scores models on ``prompt_sets`` (``count`` images each, seeds 0, 1, …), the base model first.

    ``encoders``: the feature extractors given (pixels always among them); ``reference``: the training
    images (None, with ``reference_reason`` saying why not); ``concept``: the demo's concept measure."""

    prompt_sets: dict[str, PromptSet]
    count: int
    cache: ImageCache
    batch: int
    encoders: list[Any]
    reference: torch.Tensor | None
    reference_reason: str = ""
    concept: Any = None
    base_features: dict[str, dict[str, Features]] = field(default_factory=dict)
    images: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = {encoder.name for encoder in self.encoders}
        self.missing = {name: reason for name, reason in ENCODER_OPTIONS.items() if name not in given}
        self.reference_features = (
            None if self.reference is None else {e.name: e.encode(self.reference) for e in self.encoders}
        )
        clip = next((e for e in self.encoders if e.name == "clip"), None)
        self.text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if clip is not None:
            quality = clip.encode_text(list(QUALITY_PROMPTS))
            for kind, prompts in self.prompt_sets.items():
                plain = [prompts.plain[prompts.prompt_of(k)] for k in range(self.count)]
                self.text[kind] = (clip.encode_text(plain), quality)

    def score(self, model: str, algorithm: str, render: Render) -> list[Row]:
        """Every row of ``model`` (rendering its missing images with ``render``); the first model scored must
        be :data:`BASE`, whose images the preservation metrics compare with."""
        if not self.base_features and model != BASE:
            raise ValueError("score the base model first")
        rows = []
        for kind, prompts in self.prompt_sets.items():
            images = self.cache.images(model, prompts, self.count, render, self.batch)
            self.images.setdefault(kind, {})[model] = images
            features = {encoder.name: encoder.encode(images) for encoder in self.encoders}
            if model == BASE:
                self.base_features[kind] = features
            context = Context(
                reference=self.reference_features,
                reference_reason=self.reference_reason,
                base=self.base_features[kind],
                missing_encoders=self.missing,
                text=self.text.get(kind),
                concept=self.concept,
            )
            rows += score(model, algorithm, kind, images, features, context)
        return rows

    def describe_encoders(self) -> list[str]:
        """One line per kind of features used, and per metric family skipped for want of an encoder."""
        lines = [f"features '{e.name}': {e.description}" for e in self.encoders]
        for name, reason in self.missing.items():
            lines.append(f"skipped: image metrics on '{name}' features ({ENCODER_LABELS[name]}) need {reason}")
        if "clip" in self.missing:
            lines.append(f"skipped: text_similarity and quality need {ENCODER_OPTIONS['clip']}")
        if self.reference is None:
            lines.append(
                f"skipped: image_similarity, centroid_distance, frechet_distance, kid: {self.reference_reason}"
            )
        return lines
