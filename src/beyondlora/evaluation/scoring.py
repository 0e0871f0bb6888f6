"""Which metric is computed on which prompt type with which features, and the rows it yields: a value, or
the reason it was skipped (never a stand-in 0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import metrics
from .encoders import Features

#: where a metric is computed (None: every prompt type) and whether higher is better (for the rank summary)
IMAGE_METRICS: dict[str, tuple[tuple[str, ...] | None, bool]] = {
    "image_similarity": (None, True),
    "centroid_distance": (None, False),
    "frechet_distance": (None, False),
    "kid": (None, False),
    "vendi": (None, True),
    "preservation": (("style",), True),
    "style_loss": (("style",), False),
}
TEXT_METRICS: dict[str, tuple[tuple[str, ...] | None, bool]] = {
    "text_similarity": (None, True),
    "quality": (None, True),
}
#: the demo's own measure (IoU of yellow pixels with a cross), on the prompts that name the concept
CONCEPT_METRIC = ("concept_score", ("train", "trigger"), True)
#: metrics that compare with the training images
NEEDS_REFERENCE = ("image_similarity", "centroid_distance", "frechet_distance", "kid")
#: metrics that compare with the base model's images of the same prompts and seeds
NEEDS_BASE = ("preservation", "style_loss")
#: the prompts of CLIP's image-quality test (CLIP-IQA's antonym pair)
QUALITY_PROMPTS = ("Good photo.", "Bad photo.")
ENCODER_OPTIONS = {"clip": "--clip (a local CLIP folder)", "dino": "--dino (a local DINOv2 folder)"}


@dataclass
class Row:
    """One line of the CSV: ``value`` None when skipped, with ``note`` saying why."""

    model: str
    algorithm: str
    prompt_type: str
    metric: str
    features: str
    value: float | None
    note: str = ""

    @property
    def key(self) -> str:
        """``<prompt type>/<metric>[<features>]``: the column a value has in summaries and logs."""
        return f"{self.prompt_type}/{self.metric}[{self.features}]"


def higher_is_better(metric: str) -> bool:
    """The direction of ``metric`` (for rank scaling)."""
    table = {**IMAGE_METRICS, **TEXT_METRICS, CONCEPT_METRIC[0]: (None, CONCEPT_METRIC[2])}
    return table[metric][1]


def _applies(kinds: tuple[str, ...] | None, kind: str) -> bool:
    return kinds is None or kind in kinds


@dataclass
class Context:
    """What scoring one prompt type needs besides the model's own images and features.

    ``reference``: the training images' features per encoder (None: no training images, ``reference_reason``
    says why); ``base``: the base model's features of the same prompts and seeds per encoder (for the base
    itself, its own); ``missing_encoders``: name → the option that would give it; ``text``: CLIP embeddings of
    the plain prompts (one per image) and of the two quality prompts; ``concept``: the demo's concept
    measure, on the demo's own concept."""

    reference: dict[str, Features] | None
    reference_reason: str
    base: dict[str, Features]
    missing_encoders: dict[str, str]
    text: tuple[torch.Tensor, torch.Tensor] | None = None
    concept: Callable[[torch.Tensor], torch.Tensor] | None = None


def score(
    model: str, algorithm: str, kind: str, images: torch.Tensor, features: dict[str, Features], context: Context
) -> list[Row]:
    """Every metric row of one model on one prompt type, skipped rows included."""
    rows: list[Row] = []

    def add(metric: str, feature: str, compute: Callable[[], float] | None, note: str = "") -> None:
        if compute is None:
            rows.append(Row(model, algorithm, kind, metric, feature, None, note))
            return
        try:
            rows.append(Row(model, algorithm, kind, metric, feature, compute(), note))
        except ValueError as error:  # too few images for the estimate, and the like
            rows.append(Row(model, algorithm, kind, metric, feature, None, f"skipped: {error}"))

    if context.concept is not None and kind in CONCEPT_METRIC[1]:
        add(CONCEPT_METRIC[0], "concept", lambda: float(context.concept(images).mean()), "demo concept IoU")
    for name, encoded in features.items():
        for metric, (kinds, _) in IMAGE_METRICS.items():
            if not _applies(kinds, kind):
                continue
            if metric in NEEDS_REFERENCE and context.reference is None:
                add(metric, name, None, f"skipped: {context.reference_reason}")
                continue
            add(metric, name, _image_metric(metric, encoded, context, name))
    for name, reason in context.missing_encoders.items():
        for metric, (kinds, _) in IMAGE_METRICS.items():
            if _applies(kinds, kind):
                add(metric, name, None, f"skipped: needs {reason}")
    for metric in TEXT_METRICS:
        if context.text is None or "clip" not in features:
            add(metric, "clip", None, f"skipped: needs {ENCODER_OPTIONS['clip']}")
            continue
        plain, quality = context.text
        vectors = features["clip"].vectors
        if metric == "text_similarity":
            add(metric, "clip", lambda v=vectors, t=plain: metrics.text_similarity(v, t))
        else:
            add(metric, "clip", lambda v=vectors, q=quality: metrics.quality_score(v, q[0], q[1]))
    return rows


def _image_metric(metric: str, encoded: Features, context: Context, name: str) -> Callable[[], float]:
    reference: Any = context.reference[name] if context.reference is not None else None
    base = context.base.get(name)
    table: dict[str, Callable[[], float]] = {
        "image_similarity": lambda: metrics.image_similarity(encoded.vectors, reference.vectors),
        "centroid_distance": lambda: metrics.centroid_distance(encoded.vectors, reference.vectors),
        "frechet_distance": lambda: metrics.frechet_distance(encoded.vectors, reference.vectors),
        "kid": lambda: metrics.kernel_inception_distance(encoded.vectors, reference.vectors),
        "vendi": lambda: metrics.vendi_score(encoded.vectors),
        "preservation": lambda: metrics.paired_cosine(encoded.vectors, base.vectors),
        "style_loss": lambda: metrics.style_loss(encoded.tokens, base.tokens),
    }
    return table[metric]
