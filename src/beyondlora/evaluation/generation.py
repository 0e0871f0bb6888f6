"""Images to evaluate, generated once and kept: a PNG per (model, prompt type, prompt, seed) under a folder
keyed by the generation settings, so a rerun (or a run over more checkpoints) reuses every image it has.

Image ``k`` of a prompt type with P prompts is prompt ``k mod P`` at seed ``k div P``: the first images form
the seed-major grid :func:`~beyondlora.training.sampling.generate` draws, so one call renders whole seed rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..tools.progress import progress
from ..training.report import save_image
from .prompts import PromptSet

#: renders prompts × seeds, seed-major: (len(seeds) · len(prompts), 3, H, W) in [0, 1]
Render = Callable[[list[str], list[int]], torch.Tensor]


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images as a PNG stores them (8 bits per channel): a fresh image scores exactly as its cached copy."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def file_key(path: str | Path) -> str:
    """``<name>-<first 12 hex digits of the SHA-256 of its bytes>`` (a folder: of its files' names and bytes):
    a file rewritten under the same name gets new images."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"{path.stem if path.is_file() else path.name}-{digest.hexdigest()[:12]}"


def settings_key(**settings: object) -> str:
    """A short digest of the generation settings (model, steps, guidance, resolution…)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _load_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


class ImageCache:
    """PNGs under ``<root>/<settings key>/<model key>/<prompt type>/p<prompt>-<text digest>_s<seed>.png``."""

    def __init__(self, root: str | Path, settings: str) -> None:
        self.root = Path(root) / settings

    def path(self, model: str, prompts: PromptSet, prompt: int, seed: int) -> Path:
        """Where image (``prompt``, ``seed``) of ``prompts`` for ``model`` is kept; the digest of the prompt's
        text keeps an edited template from reusing the old prompt's images."""
        digest = hashlib.sha256(prompts.prompts[prompt].encode()).hexdigest()[:8]
        return self.root / model / prompts.kind / f"p{prompt}-{digest}_s{seed}.png"

    def images(self, model: str, prompts: PromptSet, count: int, render: Render, batch: int) -> torch.Tensor:
        """The ``count`` images of ``prompts`` for ``model``: (count, 3, H, W) in [0, 1], read where cached,
        else rendered a batch of about ``batch`` images (whole seed rows) at a time and written."""
        width = len(prompts.prompts)
        wanted = [(k // width, k % width) for k in range(count)]  # (seed, prompt)
        missing_seeds = sorted({s for s, p in wanted if not self.path(model, prompts, p, s).is_file()})
        rows = max(1, batch // width)
        chunks = [missing_seeds[i : i + rows] for i in range(0, len(missing_seeds), rows)]
        for seeds in progress(chunks, f"{model} {prompts.kind}", "batch", total=len(chunks)):
            # the last seed row may be partial: it needs only its first prompts
            used = min(width, count - seeds[-1] * width) if len(seeds) == 1 else width
            rendered = quantise(render(prompts.prompts[:used], seeds))
            for index, image in enumerate(rendered):
                seed, prompt = seeds[index // used], index % used
                if seed * width + prompt < count:
                    save_image(image, self.path(model, prompts, prompt, seed))
        return torch.stack([_load_png(self.path(model, prompts, p, s)) for s, p in wanted])
